//! Optimizer state files: [`Optimizer::save_state`](crate::Optimizer::save_state) and
//! [`Optimizer::load_state`](crate::Optimizer::load_state). Imports [`crate::optim`] (what a
//! rule's buffers and fields are), the engine's plain [`State`], [`crate::plan`] and
//! [`crate::types`].
//!
//! # Format
//! A [safetensors](https://github.com/huggingface/safetensors) file, readable by Python's
//! `safetensors`, numpy and torch:
//!
//! - one `F32` tensor per state buffer and model tensor, named `<buffer>.<tensor>`, for example
//!   `m.0` and `v.0` for Adam's moments of the first tensor (buffers: `v` for Momentum and NAG,
//!   `h` for AdaGrad and RMSProp, `m`, `v` and `v_max` for Adam; SGD has none);
//! - string metadata: `format` (`fusedopt-state`), `format_version` (`2`), `optimizer` (its
//!   [`name`](crate::Optimizer::name)), `steps`, `layout` (the tensor lengths, comma-separated;
//!   `-` before the first step), `tensor_steps` (the steps each tensor has taken,
//!   comma-separated; empty before the first step), `names` (the tensor names, comma-separated;
//!   empty when none), `buffers` (the buffer names, comma-separated), `groups` (the per-tensor
//!   [`ParamGroup`]s as `lr_scale/weight_decay` with `-` for no override, comma-separated; empty
//!   when none), every hyperparameter as `config.<field>`, and `checksum`. The schedule-free
//!   rules add `sums` (their running values, `k=<f64>,lr_max=<f64>,weight_sum=<f64>`) and
//!   `mode` (`train`, or `eval` after [`eval`](crate::Optimizer::eval)).
//!
//! Compact state ([`StateFormat`]) is saved as stored: the metadata entry `state_format` names
//! the format (`f32` when absent), a bf16 buffer is a `BF16` tensor, an 8-bit buffer a `U8`
//! tensor of codes `<buffer>.<tensor>` followed by an `F32` tensor of its blocks' scales,
//! `<buffer>.<tensor>.scale`. A file loads only into an optimizer set to its format.
//!
//! The `f32` master weights of tensors trained with half-precision weights are saved as `F32`
//! tensors `master.<tensor>`; the metadata entry `master` lists those tensors (comma-separated;
//! empty or absent when none).
//!
//! Version 1 files (without `tensor_steps` and `names`) still load: every tensor has then taken
//! `steps` steps, and the tensors have no names.
//!
//! The checksum is the CRC-32 (as 8 hex digits) of every other metadata entry as `key=value\n`
//! in key order, then of each tensor's name, a newline and its little-endian bytes, in buffer
//! then tensor order.
//!
//! # Guarantees
//! Saving writes a temporary file in the destination's directory, syncs it to disk and renames it
//! over the destination, then syncs the directory: a reader sees the old file or the new one,
//! never a mix, and a failed save leaves any previous file intact. Loading happens in three stages,
//! all before the optimizer is touched: [`parse`] (a safetensors file of this format, intact by
//! its checksum), [`verify`] (the state of this rule, fitting the optimizer: kind, names,
//! buffers, layout, steps, groups, hyperparameters) and [`fit`] (the buffers in the engine's
//! layout).

use crate::engine::{
    State, check_groups, check_names, state_bytes_per_element, state_unit, zeroed_buffer,
};
use crate::optim::{FieldValue, Rule, field_map};
use crate::plan::Layout;
use crate::types::{ParamGroup, StateFormat, StepError};
use safetensors::tensor::TensorView;
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
const VERSION: &str = "2";
/// The versions this build reads.
const READS: [&str; 2] = ["1", "2"];

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
    /// The file's tensor names differ from the optimizer's
    /// ([`set_tensor_names`](crate::Optimizer::set_tensor_names)).
    Names {
        /// The file.
        path: PathBuf,
        /// Position of the first tensor whose name differs.
        tensor: usize,
        /// Its name in the optimizer.
        expected: String,
        /// Its name in the file (`None`: the file names no tensors, or fewer).
        found: Option<String>,
    },
    /// The file's hyperparameters or parameter groups are out of range.
    Config {
        /// The file.
        path: PathBuf,
        /// The problem, as a step would report it.
        error: StepError,
    },
    /// The file holds state in another format than the optimizer is set to
    /// ([`set_state_format`](crate::Optimizer::set_state_format)).
    StateFormat {
        /// The file.
        path: PathBuf,
        /// The optimizer's format.
        expected: StateFormat,
        /// The file's.
        found: StateFormat,
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
                "{}: format version {found} is not supported (this build reads versions 1 and 2)",
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
            StateError::StateFormat {
                path,
                expected,
                found,
            } => write!(
                f,
                "{}: holds {found} state, but the optimizer is set to {expected} state \
                 (set_state_format before loading)",
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
            StateError::Names {
                path,
                tensor,
                expected,
                found,
            } => match found {
                Some(found) => write!(
                    f,
                    "{}: tensor {tensor} is {found:?} in the file but {expected:?} in the optimizer",
                    path.display()
                ),
                None => write!(
                    f,
                    "{}: the file does not name tensor {tensor}, which the optimizer names {expected:?}",
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

/// A tensor of stored bytes (compact state): bf16 values, 8-bit codes, or block scales.
struct RawView {
    dtype: Dtype,
    /// Little-endian bytes.
    data: Vec<u8>,
    shape: [usize; 1],
}

impl View for RawView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A state tensor to save: `f32` values, or stored bytes.
enum SaveView<'a> {
    F32(F32View<'a>),
    Raw(RawView),
}

impl View for SaveView<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            SaveView::F32(v) => v.dtype(),
            SaveView::Raw(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            SaveView::F32(v) => v.shape(),
            SaveView::Raw(v) => v.shape(),
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            SaveView::F32(v) => v.data(),
            SaveView::Raw(v) => v.data(),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            SaveView::F32(v) => v.data_len(),
            SaveView::Raw(v) => v.data_len(),
        }
    }
}

/// Native-order bytes of `width`-byte numbers as little-endian bytes.
fn to_le(bytes: &[u8], width: usize) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytes.to_vec()
    } else {
        bytes
            .chunks_exact(width)
            .flat_map(|c| c.iter().rev().copied())
            .collect()
    }
}

/// The dtype a buffer of `format` is saved as.
fn value_dtype(format: StateFormat) -> Dtype {
    match format {
        StateFormat::Bf16 => Dtype::BF16,
        StateFormat::Q8 => Dtype::U8,
        _ => Dtype::F32,
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
                lr_scale: decode_f32(scale)?,
                weight_decay: if wd == "-" {
                    None
                } else {
                    Some(decode_f32(wd)?)
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

/// An `f32` in its text form ([`FieldValue::parse`]).
fn decode_f32(text: &str) -> Option<f32> {
    let mut x = 0.0f32;
    x.parse(text).ok().map(|()| x)
}

/// The label of state held in memory ([`save_bytes`], [`load`] of bytes) in errors.
pub(crate) const IN_MEMORY: &str = "<state bytes>";

/// What a state file holds, ready to serialize: its tensors and its metadata.
type Snapshot<'s> = (Vec<(String, SaveView<'s>)>, HashMap<String, String>);

/// `config`, `state`, `groups` and `names` as the tensors and metadata of a state file.
fn snapshot<'s, R: Rule>(
    config: &R,
    state: &'s State,
    groups: &[ParamGroup],
    names: &[String],
) -> Snapshot<'s> {
    let layout = state.layout.as_ref();
    let held = state.buffers.len().min(R::BUFFERS.len());
    let buffers: Vec<&str> = R::BUFFERS[..held].iter().map(|b| b.name).collect();
    let mut metadata = HashMap::new();
    metadata.insert("format".to_string(), FORMAT.to_string());
    metadata.insert("format_version".to_string(), VERSION.to_string());
    metadata.insert("optimizer".to_string(), R::NAME.to_string());
    metadata.insert("steps".to_string(), state.steps.to_string());
    metadata.insert(
        "layout".to_string(),
        encode_layout(layout.map(Layout::lens)),
    );
    metadata.insert("tensor_steps".to_string(), join(&state.tensor_steps));
    metadata.insert("names".to_string(), names.join(","));
    metadata.insert("buffers".to_string(), buffers.join(","));
    metadata.insert("groups".to_string(), encode_groups(groups));
    metadata.insert("state_format".to_string(), state.format.name().to_string());
    let masters: Vec<usize> = match &state.master {
        Some(_) => (0..state.master_ready.len())
            .filter(|&t| state.master_ready[t])
            .collect(),
        None => Vec::new(),
    };
    metadata.insert(
        "master".to_string(),
        masters
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    for (field, value) in field_map(config, |v| v.encode()) {
        metadata.insert(format!("config.{field}"), value);
    }
    if !R::SUMS.is_empty() {
        // Rust prints the shortest text that parses back to the same f64.
        let sums: Vec<String> = R::SUMS
            .iter()
            .zip(state.sums)
            .map(|(name, value)| format!("{name}={value:?}"))
            .collect();
        metadata.insert("sums".to_string(), sums.join(","));
    }
    if config.eval_shift().is_some() {
        let mode = if state.eval { "eval" } else { "train" };
        metadata.insert("mode".to_string(), mode.to_string());
    }
    let tensors_per_buffer = layout.map_or(0, |l| l.lens().len());
    let mut tensors = Vec::new();
    for (b, buffer) in buffers.iter().enumerate() {
        for t in 0..tensors_per_buffer {
            let name = format!("{buffer}.{t}");
            if state.format == StateFormat::F32 {
                let data = state.tensor(b, t);
                let shape = [data.len()];
                tensors.push((name, SaveView::F32(F32View { data, shape })));
                continue;
            }
            let (values, scales) = state.tensor_raw(b, t);
            let size = state_bytes_per_element(state.format);
            tensors.push((
                name.clone(),
                SaveView::Raw(RawView {
                    dtype: value_dtype(state.format),
                    data: to_le(values, size),
                    shape: [values.len() / size],
                }),
            ));
            if state.format == StateFormat::Q8 {
                tensors.push((
                    format!("{name}.scale"),
                    SaveView::Raw(RawView {
                        dtype: Dtype::F32,
                        data: to_le(scales, 4),
                        shape: [scales.len() / 4],
                    }),
                ));
            }
        }
    }
    for &t in &masters {
        let data = state.master_tensor(t);
        let shape = [data.len()];
        tensors.push((
            format!("master.{t}"),
            SaveView::F32(F32View { data, shape }),
        ));
    }
    let sum = checksum(
        &metadata,
        tensors.iter().map(|(n, v)| (n.clone(), v.data())),
    );
    metadata.insert("checksum".to_string(), sum);
    (tensors, metadata)
}

/// Writes `config`, `state`, `groups` and `names` to `path`, atomically.
pub(crate) fn save<R: Rule>(
    path: &Path,
    config: &R,
    state: &State,
    groups: &[ParamGroup],
    names: &[String],
) -> Result<(), StateError> {
    let (tensors, metadata) = snapshot(config, state, groups, names);
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

/// The bytes of the state file [`save`] would write.
///
/// # Errors
/// [`StateError::Io`] if the state cannot be serialized (a header beyond safetensors' limit).
pub(crate) fn save_bytes<R: Rule>(
    config: &R,
    state: &State,
    groups: &[ParamGroup],
    names: &[String],
) -> Result<Vec<u8>, StateError> {
    let (tensors, metadata) = snapshot(config, state, groups, names);
    safetensors::serialize(tensors, Some(metadata)).map_err(|e| StateError::Io {
        path: PathBuf::from(IN_MEMORY),
        op: "serialize",
        source: io::Error::other(e.to_string()),
    })
}

/// Reads the file at `path` whole.
///
/// # Errors
/// [`StateError::Io`] if it cannot be read.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, StateError> {
    fs::read(path).map_err(io_err(path, "read"))
}

/// A state file read and checked in full, ready to replace an optimizer's configuration, state
/// and groups.
pub(crate) struct Loaded<R> {
    pub config: R,
    pub state: State,
    pub groups: Vec<ParamGroup>,
    pub names: Vec<String>,
}

/// Reads the state file `bytes` (from `path`, or [`IN_MEMORY`], for errors) for an optimizer of
/// rule `R` that holds a state of layout `current` (`None`: no state yet), names its tensors
/// `names` (empty: no names) and keeps its state in `format`, checking everything before
/// returning it.
pub(crate) fn load<R: Rule>(
    path: &Path,
    bytes: &[u8],
    current: Option<&[usize]>,
    names: &[String],
    format: StateFormat,
) -> Result<Loaded<R>, StateError> {
    let file = parse(path, bytes)?;
    if !file.buffers.is_empty() && file.format != format {
        return Err(StateError::StateFormat {
            path: path.to_path_buf(),
            expected: format,
            found: file.format,
        });
    }
    let verified = verify::<R>(&file, current, names)?;
    let (sums, eval) = read_sums::<R>(&file, &verified.config)?;
    let mut state = fit(
        &file,
        verified.layout,
        verified.steps,
        verified.tensor_steps,
    )?;
    state.sums = sums;
    state.eval = eval;
    Ok(Loaded {
        config: verified.config,
        state,
        groups: verified.groups,
        names: verified.names,
    })
}

/// Numbers, comma-separated.
fn join(numbers: &[u64]) -> String {
    numbers
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A safetensors file of this format, intact: the metadata and every tensor the metadata
/// announces, in buffer then tensor order, matching the checksum.
struct StateFile<'a> {
    path: &'a Path,
    metadata: HashMap<String, String>,
    buffers: Vec<String>,
    /// The tensor lengths; `None` before the first step.
    lens: Option<Vec<usize>>,
    /// `tensors[b * lens.len() + t]` is buffer `b` of tensor `t`.
    tensors: Vec<TensorView<'a>>,
    /// The format of the buffers.
    format: StateFormat,
    /// For 8-bit state, `scales[b * lens.len() + t]` is the block scales of `tensors[..]`.
    scales: Vec<TensorView<'a>>,
    /// The master weights: (tensor, values).
    masters: Vec<(usize, TensorView<'a>)>,
}

impl StateFile<'_> {
    /// A [`StateError::Format`] for this file.
    fn bad(&self, reason: String) -> StateError {
        StateError::Format {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    /// The metadata entry `key`.
    fn entry(&self, key: &str) -> Result<&str, StateError> {
        entry(self.path, &self.metadata, key)
    }
}

/// The metadata entry `key` of the file at `path`.
fn entry<'m>(
    path: &Path,
    metadata: &'m HashMap<String, String>,
    key: &str,
) -> Result<&'m str, StateError> {
    metadata
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| StateError::Format {
            path: path.to_path_buf(),
            reason: format!("missing metadata entry {key:?}"),
        })
}

/// Stage 1: `bytes` as a state file of this format and version, its tensors as the metadata
/// announces them, intact by the checksum. Nothing here depends on the optimizer.
fn parse<'a>(path: &'a Path, bytes: &'a [u8]) -> Result<StateFile<'a>, StateError> {
    let bad = |reason: String| StateError::Format {
        path: path.to_path_buf(),
        reason,
    };
    let safetensors =
        SafeTensors::deserialize(bytes).map_err(|e| bad(format!("safetensors: {e}")))?;
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| bad(format!("safetensors: {e}")))?;
    let metadata = header
        .metadata()
        .clone()
        .ok_or_else(|| bad("no metadata".to_string()))?;
    let format = entry(path, &metadata, "format")?;
    if format != FORMAT {
        return Err(bad(format!("format is {format:?}, not {FORMAT:?}")));
    }
    let version = entry(path, &metadata, "format_version")?;
    if !READS.contains(&version) {
        return Err(StateError::Version {
            path: path.to_path_buf(),
            found: version.to_string(),
        });
    }
    let stored = entry(path, &metadata, "checksum")?.to_string();
    let buffers: Vec<String> = match entry(path, &metadata, "buffers")? {
        "" => Vec::new(),
        list => list.split(',').map(str::to_string).collect(),
    };
    let layout_text = entry(path, &metadata, "layout")?;
    let lens = decode_layout(layout_text)
        .ok_or_else(|| bad(format!("unreadable layout {layout_text:?}")))?;
    let count = lens.as_ref().map_or(0, Vec::len);
    let format = match metadata.get("state_format") {
        None => StateFormat::F32,
        Some(text) => text
            .parse()
            .map_err(|_| bad(format!("unknown state_format {text:?}")))?,
    };
    let mut names = Vec::with_capacity(buffers.len() * count);
    let mut views = Vec::with_capacity(buffers.len() * count);
    let mut tensors = Vec::with_capacity(buffers.len() * count);
    let mut scales = Vec::new();
    let read = |name: &str, dtype: Dtype, len: usize| {
        let view = safetensors
            .tensor(name)
            .map_err(|_| bad(format!("missing tensor {name:?}")))?;
        if view.dtype() != dtype || view.shape() != [len] {
            return Err(bad(format!(
                "tensor {name:?} is {:?} {:?}, expected {dtype:?} [{len}]",
                view.dtype(),
                view.shape()
            )));
        }
        Ok(view)
    };
    for buffer in &buffers {
        for t in 0..count {
            let name = format!("{buffer}.{t}");
            let len = lens.as_ref().map_or(0, |l| l[t]);
            let view = read(&name, value_dtype(format), len)?;
            names.push(name.clone());
            views.push(view.clone());
            tensors.push(view);
            if format == StateFormat::Q8 {
                let name = format!("{name}.scale");
                let view = read(&name, Dtype::F32, len.div_ceil(crate::simd::BLOCK))?;
                names.push(name);
                views.push(view.clone());
                scales.push(view);
            }
        }
    }
    let master_list = metadata.get("master").map_or("", String::as_str);
    let mut masters = Vec::new();
    if !master_list.is_empty() {
        for text in master_list.split(',') {
            let t: usize = text
                .parse()
                .ok()
                .filter(|&t| t < count && masters.iter().all(|(m, _)| *m < t))
                .ok_or_else(|| bad(format!("unreadable master list {master_list:?}")))?;
            let name = format!("master.{t}");
            let view = read(&name, Dtype::F32, lens.as_ref().map_or(0, |l| l[t]))?;
            names.push(name);
            views.push(view.clone());
            masters.push((t, view));
        }
    }
    if safetensors.len() != views.len() {
        return Err(bad(format!(
            "{} tensors, expected {}",
            safetensors.len(),
            views.len()
        )));
    }
    let computed = checksum(
        &metadata,
        names
            .into_iter()
            .zip(&views)
            .map(|(n, v)| (n, Cow::Borrowed(v.data()))),
    );
    if computed != stored {
        return Err(StateError::Checksum {
            path: path.to_path_buf(),
            stored,
            computed,
        });
    }
    Ok(StateFile {
        path,
        metadata,
        buffers,
        lens,
        tensors,
        format,
        scales,
        masters,
    })
}

/// What [`verify`] found: everything but the buffers' contents.
struct Verified<R> {
    config: R,
    steps: u64,
    tensor_steps: Vec<u64>,
    layout: Option<Layout>,
    groups: Vec<ParamGroup>,
    names: Vec<String>,
}

/// Stage 2: whether the file holds a state of rule `R` that fits an optimizer holding layout
/// `current` and tensor names `names`: the kind, the names ([`read_names`]), the buffers and
/// layout ([`verify_layout`]), the step counts ([`read_steps`]), the groups ([`read_groups`])
/// and the hyperparameters ([`read_config`]).
fn verify<R: Rule>(
    file: &StateFile<'_>,
    current: Option<&[usize]>,
    names: &[String],
) -> Result<Verified<R>, StateError> {
    let found = file.entry("optimizer")?;
    if found != R::NAME {
        return Err(StateError::Optimizer {
            path: file.path.to_path_buf(),
            expected: R::NAME,
            found: found.to_string(),
        });
    }
    let names = read_names(file, names)?;
    let layout = verify_layout::<R>(file, current)?;
    let (steps, tensor_steps) = read_steps(file)?;
    Ok(Verified {
        groups: read_groups(file)?,
        config: read_config(file)?,
        steps,
        tensor_steps,
        layout,
        names,
    })
}

/// The tensor names of the file: none in a version 1 file; else valid, one per tensor (or
/// none), and the same as `expected` when the optimizer names its tensors.
fn read_names(file: &StateFile<'_>, expected: &[String]) -> Result<Vec<String>, StateError> {
    let found: Vec<String> = match file.metadata.get("names").map(String::as_str) {
        None | Some("") => Vec::new(),
        Some(list) => list.split(',').map(str::to_string).collect(),
    };
    if file.entry("format_version")? != "1" {
        file.entry("names")?;
    }
    check_names(found.iter().map(String::as_str)).map_err(|e| config_error(file, e))?;
    let tensors = file.lens.as_ref().map_or(0, Vec::len);
    if !found.is_empty() && file.lens.is_some() && found.len() != tensors {
        return Err(config_error(
            file,
            StepError::NameCount {
                names: found.len(),
                tensors,
            },
        ));
    }
    if let Some(tensor) = (0..expected.len()).find(|&t| found.get(t) != Some(&expected[t])) {
        return Err(StateError::Names {
            path: file.path.to_path_buf(),
            tensor,
            expected: expected[tensor].clone(),
            found: found.get(tensor).cloned(),
        });
    }
    Ok(found)
}

/// The rule's running sums (entry `sums`, `name=value` in the rule's order) and the mode
/// (entry `mode`, `train` or `eval`), for the rules that keep them.
fn read_sums<R: Rule>(
    file: &StateFile<'_>,
    config: &R,
) -> Result<(crate::engine::Sums, bool), StateError> {
    let mut sums = [0.0; 3];
    if !R::SUMS.is_empty() {
        let text = file.entry("sums")?;
        let items: Vec<&str> = text.split(',').collect();
        let ok = items.len() == R::SUMS.len()
            && items
                .iter()
                .zip(R::SUMS)
                .zip(&mut sums)
                .all(|((item, name), sum)| {
                    let value = item.strip_prefix(name).and_then(|v| v.strip_prefix('='));
                    match value.and_then(|v| v.parse::<f64>().ok()) {
                        Some(v) if v.is_finite() && v >= 0.0 => {
                            *sum = v;
                            true
                        }
                        _ => false,
                    }
                });
        if !ok {
            let expected = R::SUMS.join("=<number>,");
            return Err(file.bad(format!(
                "sums {text:?} are not {expected}=<number>, each finite and >= 0"
            )));
        }
    }
    let eval = match config.eval_shift() {
        None => false,
        Some(_) => match file.entry("mode")? {
            "train" => false,
            "eval" => true,
            other => return Err(file.bad(format!("mode {other:?} is not train or eval"))),
        },
    };
    Ok((sums, eval))
}

/// The steps taken in all, and by each tensor: in a version 1 file, every tensor has taken them
/// all; no tensor can have taken more.
fn read_steps(file: &StateFile<'_>) -> Result<(u64, Vec<u64>), StateError> {
    let number = |text: &str| text.parse::<u64>().ok().filter(|&s| s < u64::MAX);
    let text = file.entry("steps")?;
    let steps = number(text).ok_or_else(|| file.bad(format!("unreadable steps {text:?}")))?;
    let tensors = file.lens.as_ref().map_or(0, Vec::len);
    if file.entry("format_version")? == "1" {
        let counts = if file.lens.is_some() {
            vec![steps; tensors]
        } else {
            Vec::new()
        };
        return Ok((steps, counts));
    }
    let text = file.entry("tensor_steps")?;
    let counts: Option<Vec<u64>> = match text {
        "" => Some(Vec::new()),
        list => list
            .split(',')
            .map(|n| number(n).filter(|&n| n <= steps))
            .collect(),
    };
    let expected = if file.lens.is_some() { tensors } else { 0 };
    match counts {
        Some(counts) if counts.len() == expected => Ok((steps, counts)),
        _ => Err(file.bad(format!(
            "tensor_steps {text:?} are not {expected} step counts of at most {steps}"
        ))),
    }
}

/// The file's layout, if it has one, after checking that its buffers are the rule's (a prefix of
/// them: none before the first step, every required one after it), that it can exist, and that
/// it equals `current`.
fn verify_layout<R: Rule>(
    file: &StateFile<'_>,
    current: Option<&[usize]>,
) -> Result<Option<Layout>, StateError> {
    let rule_buffers: Vec<&str> = R::BUFFERS.iter().map(|b| b.name).collect();
    if file.buffers.len() > rule_buffers.len()
        || file.buffers.iter().zip(&rule_buffers).any(|(a, b)| a != b)
    {
        return Err(file.bad(format!(
            "state buffers {:?} do not belong to {} (expected a prefix of {rule_buffers:?})",
            file.buffers,
            R::NAME
        )));
    }
    // An optional buffer, such as AMSGrad's maximum, may be missing.
    let required = R::BUFFERS.iter().filter(|b| !b.optional).count();
    let layout_text = file.entry("layout")?;
    if file.lens.is_none() && !file.buffers.is_empty()
        || file.lens.is_some() && file.buffers.len() < required
    {
        return Err(file.bad(format!(
            "{} state buffers for layout {layout_text:?}",
            file.buffers.len()
        )));
    }
    if let Some(current) = current
        && file.lens.as_deref() != Some(current)
    {
        return Err(StateError::Layout {
            path: file.path.to_path_buf(),
            expected: current.to_vec(),
            found: file.lens.clone(),
        });
    }
    // Lengths no buffer can have (only possible without buffers backing them, as for SGD).
    let unit = state_unit(file.format);
    file.lens
        .clone()
        .map(|lens| {
            Layout::aligned(lens, unit)
                .ok_or_else(|| file.bad(format!("impossible layout {layout_text:?}")))
        })
        .transpose()
}

/// A [`StateError::Config`] for this file.
fn config_error(file: &StateFile<'_>, error: StepError) -> StateError {
    StateError::Config {
        path: file.path.to_path_buf(),
        error,
    }
}

/// The parameter groups: readable, in range, one per tensor (or none).
fn read_groups(file: &StateFile<'_>) -> Result<Vec<ParamGroup>, StateError> {
    let text = file.entry("groups")?;
    let groups =
        decode_groups(text).ok_or_else(|| file.bad(format!("unreadable groups {text:?}")))?;
    check_groups(&groups).map_err(|e| config_error(file, e))?;
    let tensors = file.lens.as_ref().map_or(0, Vec::len);
    if !groups.is_empty() && groups.len() != tensors {
        return Err(config_error(
            file,
            StepError::GroupCount {
                groups: groups.len(),
                tensors,
            },
        ));
    }
    Ok(groups)
}

/// The rule's configuration: every field the file has readable (one it lacks keeps its default),
/// every value in range.
fn read_config<R: Rule>(file: &StateFile<'_>) -> Result<R, StateError> {
    let mut config = R::default();
    for (field, value) in config.fields() {
        let key = format!("config.{field}");
        // A field added to the rule after the file was written keeps its default, which is
        // what the rule did before the field existed (momentum's `form`).
        let Some(text) = file.metadata.get(&key) else {
            continue;
        };
        value
            .parse(text)
            .map_err(|_| file.bad(format!("{key} = {text:?} is not readable")))?;
    }
    config.check().map_err(|e| config_error(file, e))?;
    Ok(config)
}

/// The length of a state buffer of `state`'s layout.
fn layout_total(state: &State) -> usize {
    state.layout.as_ref().map_or(0, Layout::total)
}

/// Stage 3: the file's buffers copied into a [`State`] laid out as the engine keeps it.
fn fit(
    file: &StateFile<'_>,
    layout: Option<Layout>,
    steps: u64,
    tensor_steps: Vec<u64>,
) -> Result<State, StateError> {
    let Some(layout) = layout else {
        return Ok(State {
            steps,
            ..State::default()
        });
    };
    let count = layout.lens().len();
    let zeroed = State::zeroed(layout, file.buffers.len(), file.format, steps, tensor_steps);
    let mut state = zeroed.map_err(|e| match e {
        StepError::OutOfMemory { elements } => StateError::OutOfMemory { elements },
        error => config_error(file, error),
    })?;
    if !file.masters.is_empty() {
        let mut master = zeroed_buffer(layout_total(&state)).map_err(|e| match e {
            StepError::OutOfMemory { elements } => StateError::OutOfMemory { elements },
            error => config_error(file, error),
        })?;
        let layout = state.layout.as_ref().expect("zeroed with a layout");
        let mut ready = vec![false; count];
        for (t, view) in &file.masters {
            for (x, b) in master[layout.range(*t)]
                .iter_mut()
                .zip(view.data().chunks_exact(4))
            {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            ready[*t] = true;
        }
        state.master = Some(master);
        state.master_ready = ready;
    }
    if file.format == StateFormat::F32 {
        for (i, view) in file.tensors.iter().enumerate() {
            let out = state.tensor_mut(i / count, i % count);
            for (x, b) in out.iter_mut().zip(view.data().chunks_exact(4)) {
                *x = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        return Ok(state);
    }
    let size = state_bytes_per_element(file.format);
    for (i, view) in file.tensors.iter().enumerate() {
        let (values, scales) = state.tensor_raw_mut(i / count, i % count);
        values.copy_from_slice(&to_le(view.data(), size));
        if let Some(s) = file.scales.get(i) {
            scales.copy_from_slice(&to_le(s.data(), 4));
        }
    }
    Ok(state)
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
            assert_eq!(decode_f32(&x.encode()), Some(x));
        }
    }
}
