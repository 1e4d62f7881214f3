//! Tuned chunk lengths: a small text file written by `examples/tune.rs` and read when a step
//! needs its default chunk length. Imports only [`crate::plan`].
//!
//! The file holds `key = value` lines; `#` starts a comment:
//!
//! ```text
//! # fusedopt tuning: 16 threads, avx2
//! chunk_len = 65536          # every optimizer without an entry of its own
//! chunk_len.adam = 131072    # one optimizer (its Optimizer::name)
//! ```
//!
//! An optimizer whose chunk length was never set (or set to `0`) uses, in order: its own entry of
//! the installed tuning, the tuning's `chunk_len`, then [`DEFAULT_CHUNK_LEN`]. A tuning is
//! installed process-wide by [`Tuning::install`], or read from the file named by the
//! `FUSEDOPT_TUNING` environment variable the first time a step needs a default. A bad file named
//! by the variable is reported once on stderr and ignored; [`Tuning::load`] returns the error.
//!
//! ```standalone_crate
//! use fusedopt::{Adam, AdamConfig, Optimizer, Sgd, SgdConfig, Tuning};
//! let tuning = Tuning::parse("chunk_len = 4096\nchunk_len.adam = 8192\n").unwrap();
//! assert_eq!(tuning.chunk_len_for("adam"), Some(8192));
//! assert_eq!(tuning.chunk_len_for("sgd"), Some(4096));
//! tuning.install();
//! assert_eq!(Adam::new(AdamConfig::default()).chunk_len(), 8192);
//! assert_eq!(Sgd::new(SgdConfig::default()).chunk_len(), 4096);
//! # fusedopt::Tuning::default().install();
//! ```

use crate::plan::{DEFAULT_CHUNK_LEN, effective_chunk_len};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Once, RwLock};

/// Name of the environment variable that points to a tuning file.
pub const TUNING_ENV: &str = "FUSEDOPT_TUNING";

/// Chunk lengths chosen by measurement: one default and per-optimizer overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Chunk length for optimizers without an entry of their own (`None`: the built-in default).
    pub chunk_len: Option<usize>,
    /// Chunk length per optimizer name ([`Optimizer::name`](crate::Optimizer::name)).
    pub per_optimizer: BTreeMap<String, usize>,
}

/// A tuning file that could not be read or parsed.
#[derive(Debug)]
pub struct TuningError {
    /// The file, if one was involved.
    pub path: Option<PathBuf>,
    /// The 1-based line number, for parse errors.
    pub line: Option<usize>,
    /// What was wrong.
    pub message: String,
}

impl fmt::Display for TuningError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "tuning file {}", p.display())?,
            None => write!(f, "tuning text")?,
        }
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for TuningError {}

static INSTALLED: RwLock<Option<Tuning>> = RwLock::new(None);
static FROM_ENV: Once = Once::new();

impl Tuning {
    /// Parses the text of a tuning file.
    ///
    /// ```
    /// let t = fusedopt::Tuning::parse("# comment\nchunk_len.nag = 1000 # trailing\n").unwrap();
    /// assert_eq!((t.chunk_len, t.per_optimizer["nag"]), (None, 1000));
    /// let err = fusedopt::Tuning::parse("chunk_len = lots").unwrap_err();
    /// assert_eq!(err.line, Some(1));
    /// ```
    ///
    /// # Errors
    /// [`TuningError`] with the line number for a line that is not `key = value`, an unknown key,
    /// or a value that is not a positive whole number.
    pub fn parse(text: &str) -> Result<Tuning, TuningError> {
        let mut t = Tuning::default();
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| TuningError {
                path: None,
                line: Some(i + 1),
                message,
            };
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| err(format!("expected `key = value`, found `{line}`")))?;
            let (key, value) = (key.trim(), value.trim());
            let n: usize = value.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                err(format!(
                    "`{key}` needs a positive whole number, found `{value}`"
                ))
            })?;
            match key.strip_prefix("chunk_len") {
                Some("") => t.chunk_len = Some(n),
                Some(rest) if rest.starts_with('.') && rest.len() > 1 => {
                    t.per_optimizer.insert(rest[1..].to_string(), n);
                }
                _ => {
                    return Err(err(format!(
                        "unknown key `{key}` (expected chunk_len or chunk_len.<optimizer>)"
                    )));
                }
            }
        }
        Ok(t)
    }

    /// Reads and parses a tuning file.
    ///
    /// ```
    /// let err = fusedopt::Tuning::load("/no/such/file".as_ref()).unwrap_err();
    /// assert!(err.to_string().contains("/no/such/file"));
    /// ```
    ///
    /// # Errors
    /// [`TuningError`] naming the file if it cannot be read, or as [`Tuning::parse`].
    pub fn load(path: &Path) -> Result<Tuning, TuningError> {
        let text = std::fs::read_to_string(path).map_err(|e| TuningError {
            path: Some(path.to_owned()),
            line: None,
            message: e.to_string(),
        })?;
        Tuning::parse(&text).map_err(|e| TuningError {
            path: Some(path.to_owned()),
            ..e
        })
    }

    /// The file's text, with an optional comment line on top.
    ///
    /// ```
    /// let mut t = fusedopt::Tuning::default();
    /// t.per_optimizer.insert("adam".into(), 65536);
    /// assert_eq!(fusedopt::Tuning::parse(&t.to_text("")).unwrap(), t);
    /// ```
    pub fn to_text(&self, comment: &str) -> String {
        let mut s = String::new();
        for line in comment.lines() {
            s += &format!("# {line}\n");
        }
        if let Some(n) = self.chunk_len {
            s += &format!("chunk_len = {n}\n");
        }
        for (name, n) in &self.per_optimizer {
            s += &format!("chunk_len.{name} = {n}\n");
        }
        s
    }

    /// Writes the file (see [`Tuning::to_text`]).
    ///
    /// ```
    /// let path = std::env::temp_dir().join("fusedopt-doc-save.tune");
    /// let t = fusedopt::Tuning { chunk_len: Some(4096), ..Default::default() };
    /// t.save(&path, "example").unwrap();
    /// assert_eq!(fusedopt::Tuning::load(&path).unwrap(), t);
    /// ```
    ///
    /// # Errors
    /// [`TuningError`] naming the file if it cannot be written.
    pub fn save(&self, path: &Path, comment: &str) -> Result<(), TuningError> {
        std::fs::write(path, self.to_text(comment)).map_err(|e| TuningError {
            path: Some(path.to_owned()),
            line: None,
            message: e.to_string(),
        })
    }

    /// The chunk length this tuning gives optimizer `name`, if any.
    ///
    /// ```
    /// let t = fusedopt::Tuning::parse("chunk_len.sgd = 2048").unwrap();
    /// assert_eq!((t.chunk_len_for("sgd"), t.chunk_len_for("adam")), (Some(2048), None));
    /// ```
    pub fn chunk_len_for(&self, name: &str) -> Option<usize> {
        self.per_optimizer.get(name).copied().or(self.chunk_len)
    }

    /// Makes this the process-wide tuning: optimizers without an explicit chunk length use it from
    /// their next step on. Replaces any earlier tuning, including one from `FUSEDOPT_TUNING`.
    ///
    /// ```standalone_crate
    /// use fusedopt::{Optimizer, Sgd, SgdConfig, Tuning, DEFAULT_CHUNK_LEN};
    /// Tuning { chunk_len: Some(1024), ..Default::default() }.install();
    /// assert_eq!(Sgd::new(SgdConfig::default()).chunk_len(), 1024);
    /// Tuning::default().install();
    /// assert_eq!(Sgd::new(SgdConfig::default()).chunk_len(), DEFAULT_CHUNK_LEN);
    /// ```
    pub fn install(self) {
        FROM_ENV.call_once(|| {});
        *INSTALLED.write().unwrap_or_else(|e| e.into_inner()) = Some(self);
    }

    /// The process-wide tuning (after reading `FUSEDOPT_TUNING` if that has not happened yet).
    ///
    /// ```
    /// let _current: fusedopt::Tuning = fusedopt::Tuning::installed();
    /// ```
    pub fn installed() -> Tuning {
        load_env_once();
        INSTALLED
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

fn load_env_once() {
    FROM_ENV.call_once(|| {
        let Some(path) = std::env::var_os(TUNING_ENV) else {
            return;
        };
        match Tuning::load(Path::new(&path)) {
            Ok(t) => *INSTALLED.write().unwrap_or_else(|e| e.into_inner()) = Some(t),
            Err(e) => eprintln!("fusedopt: ignoring {TUNING_ENV}: {e}"),
        }
    });
}

/// The default chunk length of optimizer `name`: tuned if a tuning says so, else built in.
pub(crate) fn default_chunk_len(name: &str) -> usize {
    load_env_once();
    let guard = INSTALLED.read().unwrap_or_else(|e| e.into_inner());
    guard
        .as_ref()
        .and_then(|t| t.chunk_len_for(name))
        .map_or(DEFAULT_CHUNK_LEN, effective_chunk_len)
}
