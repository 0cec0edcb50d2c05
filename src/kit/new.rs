//! `tollgate plugin new NAME`: writes a standalone plugin crate from the templates embedded in
//! the binary (`template/`), so an installed `tollgate` needs no checkout to scaffold one.
//!
//! The crate depends on the plugin SDK by path. The SDK is the `plugins/sdk` crate of a tollgate
//! checkout: given with `--sdk PATH`, or else found by walking up from the new crate's folder
//! (a plugin made inside a checkout) and then from the working directory. Nothing is baked in at
//! compile time: an installed binary may run far from the tree it was built in. The crate also
//! gets the plugins workspace's `Cargo.lock`, so it builds with the dependency versions the SDK
//! was tested with.

use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("template/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("template/lib.rs.tmpl");
const GITIGNORE: &str = include_str!("template/gitignore.tmpl");
const SAMPLE_CHAT_JSON: &str = include_str!("template/samples/chat.json");
const SAMPLE_CHAT_SSE: &str = include_str!("template/samples/chat.sse");
const CARGO_LOCK: &str = include_str!("../../plugins/Cargo.lock");

/// The SDK crate's package name, to recognize its folder.
const SDK_PACKAGE: &str = "tollgate-plugin-sdk";

/// Names that cannot be a crate or that Rust reserves.
const RESERVED: &[&str] = &[
    "as",
    "async",
    "await",
    "box",
    "break",
    "const",
    "continue",
    "crate",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "fn",
    "for",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "match",
    "mod",
    "move",
    "mut",
    "priv",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "struct",
    "super",
    "trait",
    "true",
    "try",
    "type",
    "unsafe",
    "use",
    "where",
    "while",
    "yield",
    "abstract",
    "become",
    "do",
    "final",
    "macro",
    "override",
    "typeof",
    "unsized",
    "virtual",
    "gen",
    "core",
    "std",
    "alloc",
    "test",
    "proc_macro",
];

#[derive(Debug, thiserror::Error)]
pub enum NewError {
    #[error(
        "`{0}` is not a plugin name: use 1 to 64 lowercase letters, digits and `_`, starting with a letter (it becomes the crate's name and `{0}.wasm`)"
    )]
    BadName(String),
    #[error("`{0}` is a reserved word in Rust; choose another name")]
    Reserved(String),
    #[error("`{0}` already exists; choose another name or folder (nothing was written)")]
    Exists(String),
    #[error(
        "no plugin SDK found: pass --sdk PATH, the `plugins/sdk` folder of a tollgate checkout (none was found above `{0}` or the working directory)"
    )]
    NoSdk(String),
    #[error("`{0}` is not the plugin SDK (no Cargo.toml of the `tollgate-plugin-sdk` package)")]
    NotSdk(String),
    #[error("writing `{0}`: {1}")]
    Io(String, String),
}

/// What `new` wrote.
#[derive(Debug)]
pub struct Created {
    /// The crate's folder.
    pub dir: PathBuf,
    /// The SDK path written into its Cargo.toml.
    pub sdk: String,
}

/// Check a plugin name: it is the crate name, the library name and the component's file name.
pub fn validate_name(name: &str) -> Result<(), NewError> {
    let ok = (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !ok {
        return Err(NewError::BadName(name.to_string()));
    }
    if RESERVED.contains(&name) {
        return Err(NewError::Reserved(name.to_string()));
    }
    Ok(())
}

/// Write the crate `NAME` into `parent` (made if missing). Refuses an existing `parent/NAME`.
pub fn create(name: &str, parent: &Path, sdk: Option<&Path>) -> Result<Created, NewError> {
    validate_name(name)?;
    let io = |p: &Path, e: std::io::Error| NewError::Io(p.display().to_string(), e.to_string());
    let dir = parent.join(name);
    if dir.exists() {
        return Err(NewError::Exists(dir.display().to_string()));
    }
    let parent_abs = std::path::absolute(parent).map_err(|e| io(parent, e))?;
    let sdk_dir = match sdk {
        Some(p) => {
            if !is_sdk(p) {
                return Err(NewError::NotSdk(p.display().to_string()));
            }
            p.to_path_buf()
        }
        None => find_sdk(&parent_abs)
            .or_else(|| std::env::current_dir().ok().and_then(|cwd| find_sdk(&cwd)))
            .ok_or_else(|| NewError::NoSdk(parent_abs.display().to_string()))?,
    };
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    // Real paths (symbolic links resolved), as cargo walks a relative path.
    let sdk_dir = std::fs::canonicalize(&sdk_dir).map_err(|e| io(&sdk_dir, e))?;
    let dir_abs = std::fs::canonicalize(parent)
        .map_err(|e| io(parent, e))?
        .join(name);
    // Relative when the SDK and the plugin share a tree (a checkout moves as a whole).
    let sdk_text = relative(&dir_abs, &sdk_dir)
        .unwrap_or(sdk_dir)
        .to_string_lossy()
        .replace('\\', "/");
    // `create_dir` (not `_all`): a folder made meanwhile is refused, never written into.
    std::fs::create_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            NewError::Exists(dir.display().to_string())
        } else {
            io(&dir, e)
        }
    })?;
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{sdk}}", &sdk_text);
    let files: [(&str, String); 6] = [
        ("Cargo.toml", fill(CARGO_TOML)),
        ("Cargo.lock", CARGO_LOCK.to_string()),
        (".gitignore", GITIGNORE.to_string()),
        ("src/lib.rs", fill(LIB_RS)),
        ("samples/chat.json", SAMPLE_CHAT_JSON.to_string()),
        ("samples/chat.sse", SAMPLE_CHAT_SSE.to_string()),
    ];
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(|e| io(p, e))?;
        }
        std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    }
    Ok(Created { dir, sdk: sdk_text })
}

/// Whether `dir` holds the SDK crate.
fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| {
        t.lines()
            .any(|l| l.replace(' ', "") == format!("name=\"{SDK_PACKAGE}\""))
    })
}

/// The SDK of the checkout `start` is in: `plugins/sdk` (or `sdk`, inside `plugins/`) of the
/// nearest ancestor that has it.
fn find_sdk(start: &Path) -> Option<PathBuf> {
    start.ancestors().find_map(|a| {
        [a.join("plugins").join("sdk"), a.join("sdk")]
            .into_iter()
            .find(|c| is_sdk(c))
    })
}

/// `to` relative to `from` (both absolute), when they share a root.
fn relative(from: &Path, to: &Path) -> Option<PathBuf> {
    use std::path::Component;
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    // Only the root in common: an absolute path says it better.
    if common <= 1 {
        return None;
    }
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &to[common..] {
        out.push(c.as_os_str());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["acme", "my_provider", "p2", "a"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Acme",
            "my-provider",
            "2fast",
            "_x",
            "a.b",
            "a/b",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_name(bad), Err(NewError::BadName(_))),
                "{bad}"
            );
        }
        assert!(matches!(validate_name("self"), Err(NewError::Reserved(_))));
        assert!(matches!(validate_name("test"), Err(NewError::Reserved(_))));
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative(
                Path::new("/w/repo/plugins/acme"),
                Path::new("/w/repo/plugins/sdk")
            ),
            Some(PathBuf::from("../sdk"))
        );
        assert_eq!(
            relative(Path::new("/w/x/acme"), Path::new("/w/repo/plugins/sdk")),
            Some(PathBuf::from("../../repo/plugins/sdk"))
        );
        assert_eq!(relative(Path::new("/tmp/acme"), Path::new("/w/sdk")), None);
    }

    #[test]
    fn templates_name_nothing_left_unfilled() {
        for t in [CARGO_TOML, LIB_RS] {
            let filled = t.replace("{{name}}", "acme").replace("{{sdk}}", "../sdk");
            assert!(!filled.contains("{{"), "{filled}");
        }
        assert!(CARGO_LOCK.contains(SDK_PACKAGE));
    }
}
