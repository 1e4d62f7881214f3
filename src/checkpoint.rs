//! Optimizer state files: [`Optimizer::save_state`](crate::Optimizer::save_state) and
//! [`Optimizer::load_state`](crate::Optimizer::load_state).
//!
//! # Format
//! A [safetensors](https://github.com/huggingface/safetensors) file, readable by Python's
//! `safetensors`, numpy and torch:
//!
//! - one `F32` tensor per state buffer and model tensor, named `<buffer>.<tensor>`, for example
//!   `m.0` and `v.0` for Adam's moments of the first tensor (buffers: `v` for Momentum and NAG,
//!   `h` for AdaGrad and RMSProp, `m`, `v` and `v_max` for Adam; SGD has none);
//! - string metadata: `format` (`fusedopt-state`), `format_version` (`1`), `optimizer` (its
//!   [`name`](crate::Optimizer::name)), `steps`, `layout` (the tensor lengths, comma-separated;
//!   `-` before the first step), `buffers` (the buffer names, comma-separated), `groups` (the
//!   per-tensor [`ParamGroup`]s as `lr_scale/weight_decay` with `-` for no override,
//!   comma-separated; empty when none), every hyperparameter as `config.<field>`, and `checksum`.
//!
//! The checksum is the CRC-32 (as 8 hex digits) of every other metadata entry as `key=value\n`
//! in key order, then of each tensor's name, a newline and its little-endian bytes, in buffer
//! then tensor order.
//!
//! # Guarantees
//! Saving writes a temporary file in the destination's directory, syncs it to disk and renames it
//! over the destination, then syncs the directory: a reader sees the old file or the new one,
//! never a mix, and a failed save leaves any previous file intact. Loading parses and checks the
//! whole file (kind, version, layout, hyperparameters, checksum) before it touches the optimizer.

use crate::engine::Core;
use crate::optimizer::{ParamGroup, StepError};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The value of the `format` metadata entry.
const FORMAT: &str = "fusedopt-state";
/// The version this build writes and reads.
const VERSION: &str = "1";

/// Why a state file could not be saved or loaded. A failed load leaves the optimizer unchanged; a
/// failed save leaves any previous file intact.
#[derive(Debug)]
#[non_exhaustive]
pub enum StateError {
    /// The file system refused an operation.
    Io {
        /// The file concerned.
        path: PathBuf,
        /// What was being done: `"read"`, `"write"`, `"sync"`, `"rename"`.
        op: &'static str,
        /// The underlying error.
        source: io::Error,
    },
    /// Not a fusedopt state file, or a malformed one: not safetensors, a missing or unreadable
    /// metadata entry, a missing or misshapen tensor.
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The stored checksum does not match the contents: the file was truncated or altered.
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum the file states.
        stored: String,
        /// The checksum of what the file holds.
        computed: String,
    },
    /// A format version this build cannot read.
    Version {
        /// The file.
        path: PathBuf,
        /// The version the file states.
        found: String,
    },
    /// The file holds the state of another optimizer kind.
    Optimizer {
        /// The file.
        path: PathBuf,
        /// The kind of the optimizer loading it.
        expected: &'static str,
        /// The kind the file was saved by.
        found: String,
    },
    /// The file's layout differs from the one the optimizer already holds.
    Layout {
        /// The file.
        path: PathBuf,
        /// The optimizer's tensor lengths.
        expected: Vec<usize>,
        /// The file's tensor lengths (`None`: saved before any step).
        found: Option<Vec<usize>>,
    },
    /// The file's hyperparameters or parameter groups are out of range.
    Config {
        /// The file.
        path: PathBuf,
        /// The problem, as a step would report it.
        error: StepError,
    },
    /// The state buffers could not be allocated.
    OutOfMemory {
        /// Number of `f32` elements of the buffer that failed.
        elements: usize,
    },
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io { path, op, source } => {
                write!(f, "{}: could not {op}: {source}", path.display())
            }
            StateError::Format { path, reason } => {
                write!(
                    f,
                    "{}: not a valid fusedopt state file: {reason}",
                    path.display()
                )
            }
            StateError::Checksum {
                path,
                stored,
                computed,
            } => write!(
                f,
                "{}: checksum mismatch (stored {stored}, contents {computed}): the file is truncated or altered",
                path.display()
            ),
            StateError::Version { path, found } => write!(
                f,
                "{}: format version {found} is not supported (this build reads version {VERSION})",
                path.display()
            ),
            StateError::Optimizer {
                path,
                expected,
                found,
            } => write!(
                f,
                "{}: holds the state of a {found} optimizer, not {expected}",
                path.display()
            ),
            StateError::Layout {
                path,
                expected,
                found,
            } => match found {
                Some(found) => write!(
                    f,
                    "{}: layout {found:?} differs from the optimizer's {expected:?}",
                    path.display()
                ),
                None => write!(
                    f,
                    "{}: saved before any step, but the optimizer holds layout {expected:?}",
                    path.display()
                ),
            },
            StateError::Config { path, error } => write!(f, "{}: {error}", path.display()),
            StateError::OutOfMemory { elements } => write!(
                f,
                "could not allocate optimizer state of {elements} f32 elements"
            ),
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io { source, .. } => Some(source),
            StateError::Config { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// A hyperparameter's text form in a state file.
pub trait FieldValue: Sized {
    fn encode(&self) -> String;
    fn decode(s: &str) -> Option<Self>;
}

impl FieldValue for f32 {
    fn encode(&self) -> String {
        // Rust prints the shortest string that parses back to the same f32.
        self.to_string()
    }
    fn decode(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl FieldValue for bool {
    fn encode(&self) -> String {
        self.to_string()
    }
    fn decode(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

/// The `config.<field>` entries of a state file being loaded.
pub struct Fields<'a>(&'a HashMap<String, String>);

impl Fields<'_> {
    pub(crate) fn get<T: FieldValue>(&self, field: &str) -> Result<T, String> {
        let key = format!("config.{field}");
        let text = self.0.get(&key).ok_or_else(|| format!("missing {key}"))?;
        T::decode(text).ok_or_else(|| format!("{key} = {text:?} is not readable"))
    }
}

/// What the engine and state files need of a configuration: its fields as text, its checks,
/// its learning rate.
pub trait ConfigFields: Sized {
    /// Every field with its text form.
    fn fields(&self) -> Vec<(&'static str, String)>;
    /// Reads every field.
    fn from_fields(fields: &Fields<'_>) -> Result<Self, String>;
    /// The configuration's range checks.
    fn check(&self) -> Result<(), StepError>;
    /// The learning rate, which every configuration has.
    fn lr(&self) -> f32;
    /// The learning rate, to set.
    fn lr_mut(&mut self) -> &mut f32;
}

/// Implements [`ConfigFields`] for a configuration struct whose fields all implement
/// [`FieldValue`].
macro_rules! config_fields {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl $crate::checkpoint::ConfigFields for $ty {
            fn fields(&self) -> Vec<(&'static str, String)> {
                use $crate::checkpoint::FieldValue;
                vec![$((stringify!($field), self.$field.encode())),*]
            }
            fn from_fields(f: &$crate::checkpoint::Fields<'_>) -> Result<Self, String> {
                Ok($ty { $($field: f.get(stringify!($field))?),* })
            }
            fn check(&self) -> Result<(), $crate::optimizer::StepError> {
                self.validate()
            }
            fn lr(&self) -> f32 {
                self.lr
            }
            fn lr_mut(&mut self) -> &mut f32 {
                &mut self.lr
            }
        }
    };
}
pub(crate) use config_fields;

/// A state slice as a safetensors view, without copying.
struct F32View<'a> {
    data: &'a [f32],
    shape: [usize; 1],
}

impl View for F32View<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        if cfg!(target_endian = "little") {
            Cow::Borrowed(bytemuck::cast_slice(self.data))
        } else {
            Cow::Owned(self.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        }
    }
    fn data_len(&self) -> usize {
        self.data.len() * 4
    }
}

/// The CRC-32 of the metadata (except `checksum`) and the tensors, as 8 hex digits.
fn checksum<'a>(
    metadata: &HashMap<String, String>,
    tensors: impl Iterator<Item = (String, Cow<'a, [u8]>)>,
) -> String {
    let mut hasher = crc32fast::Hasher::new();
    let mut keys: Vec<&String> = metadata.keys().filter(|k| *k != "checksum").collect();
    keys.sort();
    for key in keys {
        hasher.update(format!("{key}={}\n", metadata[key]).as_bytes());
    }
    for (name, bytes) in tensors {
        hasher.update(name.as_bytes());
        hasher.update(b"\n");
        hasher.update(&bytes);
    }
    format!("{:08x}", hasher.finalize())
}

fn encode_groups(groups: &[ParamGroup]) -> String {
    let one = |g: &ParamGroup| {
        let wd = g.weight_decay.map_or("-".to_string(), |w| w.encode());
        format!("{}/{wd}", g.lr_scale.encode())
    };
    groups.iter().map(one).collect::<Vec<_>>().join(",")
}

fn decode_groups(s: &str) -> Option<Vec<ParamGroup>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',')
        .map(|g| {
            let (scale, wd) = g.split_once('/')?;
            Some(ParamGroup {
                lr_scale: f32::decode(scale)?,
                weight_decay: if wd == "-" {
                    None
                } else {
                    Some(f32::decode(wd)?)
                },
            })
        })
        .collect()
}

fn encode_layout(layout: Option<&[usize]>) -> String {
    match layout {
        None => "-".to_string(),
        Some(lens) => lens
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn decode_layout(s: &str) -> Option<Option<Vec<usize>>> {
    match s {
        "-" => Some(None),
        "" => Some(Some(Vec::new())),
        _ => s
            .split(',')
            .map(|n| n.parse().ok())
            .collect::<Option<_>>()
            .map(Some),
    }
}

/// An I/O error on `path` during `op`.
fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { path, op, source }
}

/// Writes the state of `core` and the configuration `fields` of optimizer `name` to `path`,
/// atomically.
pub(crate) fn save(
    path: &Path,
    name: &str,
    buffer_names: &[&str],
    fields: &[(&'static str, String)],
    core: &Core,
) -> Result<(), StateError> {
    let saved = core.saved_state();
    let buffers = &buffer_names[..saved.buffers.len().min(buffer_names.len())];
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("format_version".to_string(), VERSION.to_string());
    metadata.insert("optimizer".to_string(), name.to_string());
    metadata.insert("steps".to_string(), saved.steps.to_string());
    metadata.insert("layout".to_string(), encode_layout(saved.layout));
    metadata.insert("buffers".to_string(), buffers.join(","));
    metadata.insert("groups".to_string(), encode_groups(saved.groups));
    for (field, value) in fields {
        metadata.insert(format!("config.{field}"), value.clone());
    }
    let lens = saved.layout.unwrap_or(&[]);
    let mut tensors = Vec::new();
    for (b, buffer) in buffers.iter().enumerate() {
        for (t, &len) in lens.iter().enumerate() {
            let start = saved.offsets[t];
            let data = &saved.buffers[b][start..start + len];
            tensors.push((format!("{buffer}.{t}"), F32View { data, shape: [len] }));
        }
    }
    let sum = checksum(
        &metadata,
        tensors.iter().map(|(n, v)| (n.clone(), v.data())),
    );
    metadata.insert("checksum".to_string(), sum);

    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| StateError::Io {
        path: path.to_path_buf(),
        op: "write",
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        safetensors::serialize_to_file(tensors, Some(metadata), &tmp).map_err(|e| {
            StateError::Io {
                path: tmp.clone(),
                op: "write",
                source: match e {
                    safetensors::SafeTensorError::IoError(e) => e,
                    other => io::Error::other(other.to_string()),
                },
            }
        })?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&tmp, "sync"))?;
        fs::rename(&tmp, path).map_err(io_err(path, "rename"))
    })();
    if written.is_err() {
        // Best effort: the temporary file is ours and useless now.
        let _ = fs::remove_file(&tmp);
        return written;
    }
    // Make the rename itself durable. Some file systems cannot sync a directory; the file is in
    // place either way.
    if let Ok(d) = fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A state file read and checked in full, ready to replace an optimizer's state.
pub(crate) struct Loaded {
    pub metadata: HashMap<String, String>,
    pub steps: u64,
    pub layout: Option<Vec<usize>>,
    pub groups: Vec<ParamGroup>,
    /// The state buffers, laid out as the engine keeps them.
    pub state: Vec<crate::engine::StateBuf>,
}

impl Loaded {
    pub(crate) fn fields(&self) -> Fields<'_> {
        Fields(&self.metadata)
    }
}

/// Reads `path` and checks everything that does not depend on the optimizer's configuration
/// type: format, version, kind, checksum, layout (against `current`), tensors, groups.
pub(crate) fn load(
    path: &Path,
    name: &'static str,
    buffer_names: &[&str],
    current: Option<&[usize]>,
) -> Result<Loaded, StateError> {
    let bad = |reason: String| StateError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = fs::read(path).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("safetensors: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("safetensors: {e}")))?;
    let metadata = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("no metadata".to_string()))?;
    let entry = |key: &str| {
        metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| bad(format!("missing metadata entry {key:?}")))
    };
    if entry("format")? != FORMAT {
        return Err(bad(format!(
            "format is {:?}, not {FORMAT:?}",
            entry("format")?
        )));
    }
    let version = entry("format_version")?;
    if version != VERSION {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            found: version.to_string(),
        });
    }
    let stored = entry("checksum")?.to_string();
    let buffers: Vec<&str> = match entry("buffers")? {
        "" => Vec::new(),
        list => list.split(',').collect(),
    };
    let layout = decode_layout(entry("layout")?)
        .ok_or_else(|| bad(format!("unreadable layout {:?}", metadata["layout"])))?;
    let lens = layout.clone().unwrap_or_default();
    // The tensors the metadata announces, each checked for name, type and shape.
    let mut expected_names = Vec::new();
    for buffer in &buffers {
        for t in 0..lens.len() {
            expected_names.push(format!("{buffer}.{t}"));
        }
    }
    let mut views = Vec::with_capacity(expected_names.len());
    for (i, tensor) in expected_names.iter().enumerate() {
        let view = file
            .tensor(tensor)
            .map_err(|_| bad(format!("missing tensor {tensor:?}")))?;
        let len = lens[i % lens.len().max(1)];
        if view.dtype() != Dtype::F32 || view.shape() != [len] {
            return Err(bad(format!(
                "tensor {tensor:?} is {:?} {:?}, expected F32 [{len}]",
                view.dtype(),
                view.shape()
            )));
        }
        views.push(view);
    }
    if file.len() != expected_names.len() {
        return Err(bad(format!(
            "{} tensors, expected {}",
            file.len(),
            expected_names.len()
        )));
    }
    let computed = checksum(
        &metadata,
        expected_names
            .iter()
            .zip(&views)
            .map(|(n, v)| (n.clone(), Cow::Borrowed(v.data()))),
    );
    if computed != stored {
        return Err(StateError::Checksum {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    // The contents are what was saved; now whether they fit this optimizer.
    let found = entry("optimizer")?;
    if found != name {
        return Err(StateError::Optimizer {
            path: path.to_path_buf(),
            expected: name,
            found: found.to_string(),
        });
    }
    if buffers.len() > buffer_names.len() || buffers.iter().zip(buffer_names).any(|(a, b)| a != b) {
        return Err(bad(format!(
            "state buffers {buffers:?} do not belong to {name} (expected a prefix of {buffer_names:?})"
        )));
    }
    // Buffers and layout go together: none before the first step, all of the kind's required
    // buffers after it (Adam's third, AMSGrad's maximum, is optional).
    let required = buffer_names.len().min(2);
    if layout.is_none() && !buffers.is_empty() || layout.is_some() && buffers.len() < required {
        return Err(bad(format!(
            "{} state buffers for layout {:?}",
            buffers.len(),
            metadata["layout"]
        )));
    }
    // Lengths no slice can have (only possible without buffers backing them).
    let total = lens.iter().try_fold(0usize, |acc, &len| {
        acc.checked_add(len.checked_next_multiple_of(16)?)
    });
    if total.is_none_or(|t| t > isize::MAX as usize / 4) {
        return Err(bad(format!("impossible layout {:?}", metadata["layout"])));
    }
    if let Some(current) = current
        && layout.as_deref() != Some(current)
    {
        return Err(StateError::Layout {
            path: path.to_path_buf(),
            expected: current.to_vec(),
            found: layout,
        });
    }
    let steps: u64 = entry("steps")?
        .parse()
        .ok()
        .filter(|&s| s < u64::MAX)
        .ok_or_else(|| bad(format!("unreadable steps {:?}", metadata["steps"])))?;
    let groups = decode_groups(entry("groups")?)
        .ok_or_else(|| bad(format!("unreadable groups {:?}", metadata["groups"])))?;
    let config_error = |error| StateError::Config {
        path: path.to_path_buf(),
        error,
    };
    crate::engine::check_groups(&groups).map_err(config_error)?;
    if !groups.is_empty() && groups.len() != lens.len() {
        return Err(config_error(StepError::GroupCount {
            groups: groups.len(),
            tensors: lens.len(),
        }));
    }
    let state = crate::engine::build_state(&lens, buffers.len(), |b, t, out| {
        let bytes = views[b * lens.len() + t].data();
        for (x, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    })
    .map_err(|e| match e {
        StepError::OutOfMemory { elements } => StateError::OutOfMemory { elements },
        other => config_error(other),
    })?;
    Ok(Loaded {
        metadata,
        steps,
        layout,
        groups,
        state,
    })
}

/// Checks a configuration read from `path`.
pub(crate) fn check_config<C: ConfigFields>(path: &Path, loaded: &Loaded) -> Result<C, StateError> {
    let config = C::from_fields(&loaded.fields()).map_err(|reason| StateError::Format {
        path: path.to_path_buf(),
        reason,
    })?;
    config.check().map_err(|error| StateError::Config {
        path: path.to_path_buf(),
        error,
    })?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_layouts_round_trip() {
        let groups = [
            ParamGroup::DEFAULT,
            ParamGroup::NO_WEIGHT_DECAY,
            ParamGroup {
                lr_scale: 1.0 / 3.0,
                weight_decay: Some(1e-7),
            },
        ];
        assert_eq!(decode_groups(&encode_groups(&groups)).unwrap(), groups);
        assert_eq!(decode_groups("").unwrap(), []);
        assert!(decode_groups("1/").is_none() && decode_groups("x/1").is_none());
        for layout in [None, Some(vec![]), Some(vec![0, 3, 100_000])] {
            assert_eq!(
                decode_layout(&encode_layout(layout.as_deref())),
                Some(layout)
            );
        }
        assert_eq!(decode_layout("1,,2"), None);
    }

    #[test]
    fn f32_fields_round_trip_exactly() {
        for x in [0.001f32, 1e-7, 0.999, 1.0 / 3.0, f32::MIN_POSITIVE, 1e-45] {
            assert_eq!(f32::decode(&x.encode()), Some(x));
        }
    }
}
