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
        /// Split the rows into K folds by the MD5 of their text (the fold of a row is the
        /// digest, read as one big-endian number, mod K) and print the figures of each
        /// held-out fold and their mean. Rules are written by hand: justify a change with
        /// `--except-fold i` (the training folds) and read its effect with `--only-fold i`.
        #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(2..), conflicts_with = "by_source")]
        folds: Option<u32>,
        /// Leave one source out: every source is a held-out part of its own (its name is the
        /// fold's name for --only-fold and --except-fold).
        #[arg(long)]
        by_source: bool,
        /// Score only the rows of this fold (a number below K with --folds, a source with
        /// --by-source), with the whole report.
        #[arg(long, value_name = "FOLD", conflicts_with = "except_fold")]
        only_fold: Option<String>,
        /// Score every row except this fold's, with the whole report.
        #[arg(long, value_name = "FOLD")]
        except_fold: Option<String>,
        /// Run the policy plugins after the rules, as the gateway does (on a row the rules did
        /// not block): the bundled ones, and those of the configured plugins folder.
        #[arg(long)]
        plugins: bool,
        /// With --plugins: load the plugin files from this folder instead (a file overrides a
        /// bundled plugin of its name). With --folds or --by-source, `{fold}` in it is replaced
        /// by each row's fold: every fold is screened by plugins trained without it (see
        /// `plugins/policy_scorer/train/heldout.sh`).
        #[arg(long, value_name = "DIR", requires = "plugins")]
        plugin_dir: Option<String>,
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

pub fn run(
    cmd: PolicyCommand,
    default_dir: &Path,
    plugins_cfg: &crate::config::PluginsConfig,
) -> anyhow::Result<ExitCode> {
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
            folds,
            by_source,
            only_fold,
            except_fold,
            plugins,
            plugin_dir,
        } => {
            let split = match (folds, by_source) {
                (Some(k), _) => Some(Split::Folds(k)),
                (None, true) => Some(Split::BySource),
                (None, false) => None,
            };
            let filter = match (only_fold, except_fold) {
                (Some(f), _) => Filter::Only(f),
                (None, Some(f)) => Filter::Except(f),
                (None, None) => Filter::All,
            };
            if split.is_none() && !matches!(filter, Filter::All) {
                anyhow::bail!("--only-fold and --except-fold need --folds K or --by-source");
            }
            if let (Some(Split::Folds(k)), Filter::Only(f) | Filter::Except(f)) = (split, &filter)
                && f.parse::<u32>().map_or(true, |i| i >= k)
            {
                anyhow::bail!("with --folds {k}, a fold is a number from 0 to {}", k - 1);
            }
            let c = load(dir.as_deref().unwrap_or(default_dir))?;
            let set = set.unwrap_or_else(|| c.default_set.clone());
            if plugin_dir.as_deref().is_some_and(|d| d.contains("{fold}")) && split.is_none() {
                anyhow::bail!("{{fold}} in --plugin-dir needs --folds K or --by-source");
            }
            let stage = plugins.then(|| PluginStages {
                cfg: plugins_cfg.clone(),
                dir: plugin_dir,
                loaded: Default::default(),
            });
            eval(
                &c,
                stage.as_ref(),
                &EvalArgs {
                    file: &file,
                    set: &set,
                    misses: misses.as_deref(),
                    all_hits,
                    split,
                    filter,
                },
            )?;
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

/// How `policy eval` splits the rows into held-out parts.
#[derive(Clone, Copy)]
enum Split {
    /// K folds by the MD5 of the text.
    Folds(u32),
    /// One part per source.
    BySource,
}

/// Which rows of the split `policy eval` scores.
enum Filter {
    All,
    Only(String),
    Except(String),
}

/// The held-out part a row belongs to.
fn fold_of(split: Split, text: &str, source: &str) -> String {
    match split {
        Split::Folds(k) => {
            let n = u128::from_be_bytes(md5(text.as_bytes())) % u128::from(k.max(1));
            n.to_string()
        }
        Split::BySource => source.to_string(),
    }
}

/// MD5 (RFC 1321) of a text: only to split rows into folds reproducibly (the fold of a row is
/// `int(hashlib.md5(text).hexdigest(), 16) % K` in Python); not for anything secret.
fn md5(data: &[u8]) -> [u8; 16] {
    const SHIFT: [u32; 16] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];
    let k: Vec<u32> = (1..=64u32)
        .map(|i| (f64::from(i).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend((data.len() as u64).wrapping_mul(8).to_le_bytes());
    let mut h: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    for chunk in msg.chunks_exact(64) {
        let m: Vec<u32> = chunk
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let [mut a, mut b, mut c, mut d] = h;
        for (i, ki) in k.iter().enumerate() {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let f = f.wrapping_add(a).wrapping_add(*ki).wrapping_add(m[g]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(f.rotate_left(SHIFT[(i / 16) * 4 + i % 4]));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 16];
    for (o, x) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

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

/// A source's (harmful, caught, benign, benign blocked) rows.
type SourceCounts = (u64, u64, u64, u64);

/// The figures of a set of rows.
#[derive(Default)]
struct Tally {
    rows: u64,
    harmful: u64,
    caught: u64,
    i2p: u64,
    i2p_caught: u64,
    benign: u64,
    benign_blocked: u64,
    /// Severe category → (rows, blocked), i2p_hard apart.
    severe: std::collections::BTreeMap<&'static str, (u64, u64)>,
    per_cat: std::collections::BTreeMap<String, Count>,
    per_source: std::collections::BTreeMap<String, SourceCounts>,
}

impl Tally {
    fn add(
        &mut self,
        categories: &[String],
        source: &str,
        labels: &[String],
        blocked: bool,
        cats: &std::collections::BTreeSet<String>,
    ) {
        self.rows += 1;
        let is_benign = labels.iter().all(|l| l == "benign");
        let entry = self.per_source.entry(source.to_string()).or_default();
        if is_benign {
            self.benign += 1;
            entry.2 += 1;
            if blocked {
                self.benign_blocked += 1;
                entry.3 += 1;
            }
        } else if source == "i2p_hard" {
            self.i2p += 1;
            self.i2p_caught += u64::from(blocked);
        } else {
            self.harmful += 1;
            self.caught += u64::from(blocked);
            entry.0 += 1;
            entry.1 += u64::from(blocked);
        }
        for cat in categories {
            let labelled = labels.iter().any(|l| l == cat);
            let predicted = cats.contains(cat);
            let e = self.per_cat.entry(cat.clone()).or_default();
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
                    let e = self.severe.entry(s).or_default();
                    e.0 += 1;
                    e.1 += u64::from(blocked);
                }
            }
        }
    }

    fn recall(&self) -> f64 {
        ratio(self.caught, self.harmful)
    }

    fn fpr(&self) -> f64 {
        ratio(self.benign_blocked, self.benign)
    }

    fn severe_recall(&self, s: &str) -> f64 {
        self.severe.get(s).map_or(f64::NAN, |(n, k)| ratio(*k, *n))
    }

    /// The whole report of one set of rows.
    fn print(&self, set: &str) {
        say(&format!("set: {set}; rows: {}", self.rows));
        say(&format!(
            "harmful recall (any block, i2p_hard apart): {:.3} ({}/{})",
            self.recall(),
            self.caught,
            self.harmful
        ));
        say(&format!(
            "i2p_hard recall: {:.3} ({}/{})",
            ratio(self.i2p_caught, self.i2p),
            self.i2p_caught,
            self.i2p
        ));
        say(&format!(
            "benign blocked (FPR): {:.3} ({}/{})",
            self.fpr(),
            self.benign_blocked,
            self.benign
        ));
        say("\nsevere categories (recall, any block):");
        for (s, (n, k)) in &self.severe {
            say(&format!("  {s:<22} {:.3} ({k}/{n})", ratio(*k, *n)));
        }
        say("\nper category (block on that category):");
        say("  category               precision  recall  f1");
        for (cat, e) in &self.per_cat {
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
        for (src, (h, k, b, fl)) in &self.per_source {
            say(&format!(
                "  {src:<40} recall {:>6.3} ({k}/{h})   fpr {:>6.3} ({fl}/{b})",
                ratio(*k, *h),
                ratio(*fl, *b)
            ));
        }
    }
}

/// The mean of the defined figures ("-" when none is).
fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

fn fmt3(x: f64) -> String {
    if x.is_nan() {
        "-".to_string()
    } else {
        format!("{x:.3}")
    }
}

/// One line per held-out part (its recall, i2p recall, benign FPR and each severe category's
/// recall), their mean; with folds, per source the same figures per fold and their mean.
fn print_folds(parts: &[(String, Tally)], split: Split, set: &str) {
    let rows: u64 = parts.iter().map(|p| p.1.rows).sum();
    let how = match split {
        Split::Folds(k) => format!("{k} folds by the md5 of the text"),
        Split::BySource => "leave one source out".to_string(),
    };
    say(&format!(
        "set: {set}; rows: {rows}; held-out parts: {how}; figures on each held-out part"
    ));
    let w = parts
        .iter()
        .map(|p| p.0.len())
        .chain([8])
        .max()
        .unwrap_or(8);
    let short = [
        "csam", "traffick", "terror", "self_hrm", "malware", "jailbrk",
    ];
    let mut head = format!(
        "{:<w$} {:>6} {:>7} {:>7} {:>7}",
        "held-out", "rows", "recall", "i2p", "FPR"
    );
    for s in short {
        head.push_str(&format!(" {s:>8}"));
    }
    say(&head);
    let line = |name: &str, rows: String, f: [f64; 3], sev: Vec<f64>| {
        let mut l = format!(
            "{name:<w$} {rows:>6} {:>7} {:>7} {:>7}",
            fmt3(f[0]),
            fmt3(f[1]),
            fmt3(f[2])
        );
        for x in sev {
            l.push_str(&format!(" {:>8}", fmt3(x)));
        }
        l
    };
    for (name, t) in parts {
        say(&line(
            name,
            t.rows.to_string(),
            [t.recall(), ratio(t.i2p_caught, t.i2p), t.fpr()],
            SEVERE.iter().map(|s| t.severe_recall(s)).collect(),
        ));
    }
    say(&line(
        "mean",
        String::new(),
        [
            mean(parts.iter().map(|p| p.1.recall())),
            mean(parts.iter().map(|p| ratio(p.1.i2p_caught, p.1.i2p))),
            mean(parts.iter().map(|p| p.1.fpr())),
        ],
        SEVERE
            .iter()
            .map(|s| mean(parts.iter().map(|p| p.1.severe_recall(s))))
            .collect(),
    ));
    if let Split::Folds(_) = split {
        let mut sources: Vec<&String> = parts.iter().flat_map(|p| p.1.per_source.keys()).collect();
        sources.sort();
        sources.dedup();
        say("\nper source, each held-out fold then the mean: harmful recall | benign FPR");
        for src in sources {
            let fig = |pick: fn(&SourceCounts) -> f64| -> Vec<f64> {
                parts
                    .iter()
                    .map(|p| p.1.per_source.get(src).map_or(f64::NAN, pick))
                    .collect()
            };
            let rec = fig(|e| ratio(e.1, e.0));
            let fpr = fig(|e| ratio(e.3, e.2));
            let cells = |v: &[f64]| {
                let mut s: Vec<String> = v.iter().map(|x| format!("{:>5}", fmt3(*x))).collect();
                s.push(format!("{:>5}", fmt3(mean(v.iter().copied()))));
                s.join(" ")
            };
            say(&format!("  {src:<40} {} | {}", cells(&rec), cells(&fpr)));
        }
    }
}

/// The plugin stages of `policy eval --plugins`: one, or one per fold when the folder names
/// `{fold}`, each loaded when its first row comes.
struct PluginStages {
    cfg: crate::config::PluginsConfig,
    dir: Option<String>,
    loaded: std::cell::RefCell<std::collections::BTreeMap<String, std::rc::Rc<PluginStage>>>,
}

impl PluginStages {
    fn for_fold(&self, fold: Option<&str>) -> anyhow::Result<std::rc::Rc<PluginStage>> {
        let dir = self
            .dir
            .as_ref()
            .map(|d| d.replace("{fold}", fold.unwrap_or_default()));
        let key = dir.clone().unwrap_or_default();
        if let Some(s) = self.loaded.borrow().get(&key) {
            return Ok(s.clone());
        }
        let mut cfg = self.cfg.clone();
        if let Some(d) = dir {
            cfg.dir = PathBuf::from(d);
        }
        let stage = std::rc::Rc::new(PluginStage::new(&cfg)?);
        self.loaded.borrow_mut().insert(key, stage.clone());
        Ok(stage)
    }
}

/// The policy plugins `policy eval --plugins` runs after the rules, with a runtime to drive
/// their calls.
struct PluginStage {
    registry: std::sync::Arc<crate::plugins::Registry>,
    rt: tokio::runtime::Runtime,
}

impl PluginStage {
    fn new(cfg: &crate::config::PluginsConfig) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let registry = crate::plugins::Registry::new(cfg, metrics)?;
        let names: Vec<String> = registry
            .policies()
            .iter()
            .map(|p| format!("{} ({:?})", p.name, p.origin))
            .collect();
        eprintln!("policy plugins: {}", names.join(", "));
        Ok(Self { registry, rt })
    }

    /// Add the plugins' verdicts to a verdict the rules did not block, as the gateway does
    /// (`moderation::add_plugin_verdict`); a plugin that fails is reported and skipped.
    fn screen(&self, c: &Compiled, v: &mut super::Verdict, text: &str, set: &str) {
        if v.action == Action::Block {
            return;
        }
        for plugin in self.registry.policies() {
            let normalized = v.normalized.clone();
            let input = crate::plugins::PolicyInput {
                normalized: &normalized,
                original: text,
                model: "",
                route: "policy-eval",
                policy_set: set,
            };
            match self.rt.block_on(plugin.screen(&input)) {
                Ok(pv) => {
                    if crate::moderation::add_plugin_verdict(v, c, set, &plugin.name, pv)
                        == Action::Block
                    {
                        return;
                    }
                }
                Err(e) => eprintln!("policy plugin {} failed: {e}", plugin.name),
            }
        }
    }
}

/// What `policy eval` was asked for, after its flags are checked.
struct EvalArgs<'a> {
    file: &'a Path,
    set: &'a str,
    misses: Option<&'a Path>,
    all_hits: bool,
    split: Option<Split>,
    filter: Filter,
}

fn eval(c: &Compiled, stages: Option<&PluginStages>, a: &EvalArgs<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    let f = std::fs::File::open(a.file)?;
    let mut misses = match a.misses {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let mut whole = Tally::default();
    let mut parts: std::collections::BTreeMap<String, Tally> = Default::default();
    let mut bytes = 0usize;
    let mut elapsed = std::time::Duration::ZERO;
    let (mut plugin_time, mut plugin_rows) = (std::time::Duration::ZERO, 0u64);
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let row: serde_json::Value = serde_json::from_str(&line)?;
        let text = row["text"].as_str().unwrap_or_default();
        let source = row["source"].as_str().unwrap_or("unknown").to_string();
        let fold = a.split.map(|s| fold_of(s, text, &source));
        let keep = match (&a.filter, &fold) {
            (Filter::Only(x), Some(f)) => x == f,
            (Filter::Except(x), Some(f)) => x != f,
            _ => true,
        };
        if !keep {
            continue;
        }
        let labels: Vec<String> = row["labels"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let t = std::time::Instant::now();
        let mut v = c.screen(text, a.set);
        elapsed += t.elapsed();
        bytes += text.len();
        if let Some(stages) = stages
            && v.action != Action::Block
        {
            let stage = stages.for_fold(fold.as_deref())?;
            let t = std::time::Instant::now();
            stage.screen(c, &mut v, text, a.set);
            plugin_time += t.elapsed();
            plugin_rows += 1;
        }
        let blocked = v.action == Action::Block;
        let cats: std::collections::BTreeSet<String> = v
            .hits
            .iter()
            .filter(|h| h.action == Action::Block)
            .map(|h| h.category.clone())
            .collect();
        let is_benign = labels.iter().all(|l| l == "benign");
        if let Some(w) = misses.as_mut()
            && (is_benign == blocked || (blocked && a.all_hits))
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
        whole.add(&c.categories, &source, &labels, blocked, &cats);
        if let (Some(f), Filter::All) = (fold, &a.filter) {
            parts
                .entry(f)
                .or_default()
                .add(&c.categories, &source, &labels, blocked, &cats);
        }
    }
    match (a.split, &a.filter) {
        (Some(split), Filter::All) => {
            let mut parts: Vec<(String, Tally)> = parts.into_iter().collect();
            // Folds in number order (a source's name is its own order).
            parts.sort_by_key(|p| (p.0.parse::<u64>().unwrap_or(u64::MAX), p.0.clone()));
            print_folds(&parts, split, a.set);
        }
        _ => whole.print(a.set),
    }
    let secs = elapsed.as_secs_f64();
    say(&format!(
        "\nthroughput: {:.1} MB/s, {:.0} prompts/s (one core, screening only)",
        bytes as f64 / secs / 1e6,
        whole.rows as f64 / secs
    ));
    if stages.is_some() {
        say(&format!(
            "policy plugins: {plugin_rows} prompts the rules passed, {:.1} µs each (every plugin, a fresh instance per call)",
            plugin_time.as_secs_f64() * 1e6 / plugin_rows.max(1) as f64
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Split, fold_of, md5};

    fn hex(d: [u8; 16]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn md5_matches_the_reference_vectors() {
        assert_eq!(hex(md5(b"")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hex(md5(b"abc")), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            hex(md5(b"The quick brown fox jumps over the lazy dog")),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        let long = "1234567890".repeat(8);
        assert_eq!(
            hex(md5(long.as_bytes())),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    #[test]
    fn a_row_keeps_its_fold() {
        // int("900150983cd24fb0d6963f7d28e17f72", 16) % 5 == 0
        assert_eq!(fold_of(Split::Folds(5), "abc", "s"), "0");
        assert_eq!(fold_of(Split::BySource, "abc", "s"), "s");
    }
}
