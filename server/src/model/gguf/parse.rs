//! The GGUF container: header, metadata key/values, tensor infos and the tensor data section.
//!
//! Layout (versions 2 and 3, little endian): the magic `GGUF`, a `u32` version, a `u64` tensor
//! count and a `u64` key/value count; then the key/values (`string` key, `u32` value type, value),
//! then one info per tensor (`string` name, `u32` dimension count, `u64` dimensions fastest-first,
//! `u32` ggml type, `u64` offset into the data section). The data section starts at the next
//! multiple of `general.alignment` (32 when absent). Strings are a `u64` length and UTF-8 bytes.
//!
//! Every malformed input is reported as an [`Error::Model`] naming the file; nothing here panics
//! on bad data.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::dequant;

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// ggml allows at most this many tensor dimensions.
const MAX_DIMS: u32 = 4;

/// Arrays nested deeper than this are refused (keeps recursion bounded on hostile input).
const MAX_ARRAY_NESTING: usize = 8;

/// A metadata value. Arrays may hold any type, including further arrays.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `uint8`.
    U8(u8),
    /// `int8`.
    I8(i8),
    /// `uint16`.
    U16(u16),
    /// `int16`.
    I16(i16),
    /// `uint32`.
    U32(u32),
    /// `int32`.
    I32(i32),
    /// `float32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// `string` (UTF-8).
    String(String),
    /// `array` of values of one type.
    Array(Vec<Value>),
    /// `uint64`.
    U64(u64),
    /// `int64`.
    I64(i64),
    /// `float64`.
    F64(f64),
}

impl Value {
    /// The GGUF name of this value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// Any integer value that is non-negative, as `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, as `i64` (`None` for a `u64` above `i64::MAX`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric value (float or integer), as `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self
                .as_i64()
                .map(|v| v as f64)
                .or_else(|| self.as_u64().map(|v| v as f64)),
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $block:literal, $size:literal;)*) => {
        /// A ggml tensor element type. Every type a GGUF file may declare is known here (so sizes
        /// can be checked and errors can name it); [`dequant`](super::dequant) converts a subset.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $(
                #[doc = concat!("`", $name, "` (ggml type ", stringify!($id), ").")]
                $variant,
            )*
        }

        impl GgmlType {
            /// The type with ggml id `id`, if it is one.
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            /// The ggml id.
            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$variant => $id,)*
                }
            }

            /// The name llama.cpp uses (`Q4_1`, `BF16`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// Elements per block.
            pub fn block_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $block,)*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $size,)*
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 40;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
    NVFP4 = 40, "NVFP4", 64, 36;
    Q1_0 = 41, "Q1_0", 128, 18;
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions as GGUF lists them: fastest-varying first (the reverse of the HF shape).
    pub dims: Vec<u64>,
    /// Element encoding.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
    /// Number of elements.
    pub n_elements: u64,
    /// Number of bytes the data takes.
    pub n_bytes: u64,
}

impl TensorInfo {
    /// The shape outermost-first (HF convention): the GGUF dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        // Every dimension was checked at parse time to fit the file, so it fits a usize.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: its metadata and tensor table, with the file's bytes kept (memory-mapped)
/// for reading tensor data.
pub struct GgufFile {
    path: PathBuf,
    /// Format version (2 or 3).
    pub version: u32,
    /// All metadata key/values.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// `general.alignment`, or 32.
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
    storage: Storage,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses the GGUF file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let storage = if len == 0 {
            // mmap refuses empty files; the parser reports them as truncated.
            Storage::Owned(Vec::new())
        } else {
            // SAFETY: the map is read-only and lives as long as `GgufFile`. As with any mmap,
            // another process truncating or rewriting the file while it is mapped is outside
            // what we can guard against; model files are not modified while being served.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            Storage::Mmap(map)
        };
        Self::parse(path, storage)
    }

    /// Parses a GGUF image held in memory; `name` is used in error messages.
    pub fn from_bytes(bytes: Vec<u8>, name: &Path) -> Result<Self> {
        Self::parse(name, Storage::Owned(bytes))
    }

    fn parse(path: &Path, storage: Storage) -> Result<Self> {
        let header = parse_header(storage.bytes(), path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            version: header.version,
            metadata: header.metadata,
            tensors: header.tensors,
            alignment: header.alignment,
            data_offset: header.data_offset,
            storage,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw (still encoded) bytes of a tensor of this file.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        // Bounds were checked at parse time, so these conversions and the slice cannot fail for
        // an info that came from this file.
        let start = (self.data_offset + info.offset) as usize;
        &self.storage.bytes()[start..start + info.n_bytes as usize]
    }

    /// Decodes a tensor to f32 in the HF shape (the GGUF dimensions reversed).
    pub fn dequantize(&self, info: &TensorInfo) -> Result<Tensor> {
        let data = dequant::dequantize(info.ggml_type, self.tensor_bytes(info), info.n_elements as usize)
            .map_err(|e| self.error(format!("tensor {}: {e}", info.name)))?;
        Ok(Tensor::new(info.shape(), data))
    }

    /// Decodes the tensor called `name` (see [`GgufFile::dequantize`]).
    pub fn dequantize_by_name(&self, name: &str) -> Result<Tensor> {
        let info = self
            .tensor_info(name)
            .ok_or_else(|| self.error(format!("no tensor named {name:?}")))?;
        self.dequantize(info)
    }

    /// An [`Error::Model`] naming this file.
    pub fn error(&self, what: impl fmt::Display) -> Error {
        Error::Model(format!("{}: {what}", self.path.display()))
    }
}

struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    alignment: u64,
    data_offset: u64,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn error(&self, what: impl fmt::Display) -> Error {
        Error::Model(format!("{}: {what}", self.path.display()))
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn fmt::Display) -> Result<&'a [u8]> {
        if self.remaining() < n {
            return Err(self.error(format_args!(
                "GGUF file truncated: reading {what} at offset {} needs {n} bytes but only {} remain",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn fmt::Display) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &dyn fmt::Display) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &dyn fmt::Display) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &dyn fmt::Display) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &dyn fmt::Display) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length or count that must be backed by at least `min_item_bytes` bytes per item.
    fn count(&mut self, min_item_bytes: usize, what: &dyn fmt::Display) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let room = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > room {
            return Err(self.error(format_args!(
                "GGUF file truncated or corrupt: {what} at offset {at} declares {n} items but only {} bytes remain",
                self.remaining()
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn fmt::Display) -> Result<String> {
        let len = self.count(1, what)?;
        let at = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(format_args!("invalid UTF-8 in {what} at offset {at}")))
    }

    fn value(&mut self, ty: u32, what: &dyn fmt::Display, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => {
                let at = self.pos;
                match self.u8(what)? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => return Err(self.error(format_args!("invalid bool {b} in {what} at offset {at}"))),
                }
            }
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(self.error(format_args!(
                        "{what}: arrays nested deeper than {MAX_ARRAY_NESTING}"
                    )));
                }
                let elem_ty = self.u32(what)?;
                let min = min_value_size(elem_ty).ok_or_else(|| {
                    self.error(format_args!(
                        "unknown metadata value type {elem_ty} in array {what}"
                    ))
                })?;
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for i in 0..n {
                    items.push(self.value(elem_ty, &format_args!("{what}[{i}]"), depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => return Err(self.error(format_args!("unknown metadata value type {other} for {what}"))),
        })
    }
}

/// The fewest bytes a value of type `ty` takes, or `None` for an unknown type.
fn min_value_size(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

fn parse_header(buf: &[u8], path: &Path) -> Result<Header> {
    let mut r = Reader { buf, pos: 0, path };
    let magic = r.array::<4>(&"magic")?;
    if &magic != b"GGUF" {
        return Err(r.error(format_args!(
            "not a GGUF file: bad magic {:?} (expected \"GGUF\")",
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = r.u32(&"version")?;
    match version {
        2 | 3 => {}
        1 => return Err(r.error("GGUF version 1 is not supported (only versions 2 and 3)")),
        v if v & 0xffff == 0 && matches!(v.swap_bytes(), 1..=3) => {
            return Err(r.error("big-endian GGUF files are not supported"))
        }
        v => return Err(r.error(format_args!("unknown GGUF version {v} (supported: 2 and 3)"))),
    }
    // A tensor info takes at least 8 (name) + 4 (n_dims) + 4 (type) + 8 (offset) bytes; a
    // key/value at least 8 (key) + 4 (type) + 1 (value).
    let tensor_count = r.u64(&"tensor count")?;
    let kv_count = r.count(13, &"metadata key/value count")?;
    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format_args!("metadata key #{i}"))?;
        let ty = r.u32(&format_args!("type of metadata key {key:?}"))?;
        let value = r.value(ty, &format_args!("metadata value {key:?}"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(r.error(format_args!("duplicate metadata key {key:?}")));
        }
    }
    let room = (r.remaining() / 24) as u64;
    if tensor_count > room {
        return Err(r.error(format_args!(
            "GGUF file truncated or corrupt: {tensor_count} tensors declared but only {} bytes remain for their infos",
            r.remaining()
        )));
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(r.error(format_args!(
                    "general.alignment must be a positive power of two, got {v:?}"
                )))
            }
        },
    };
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count as usize);
    let mut names = std::collections::HashSet::new();
    for i in 0..tensor_count {
        let name = r.string(&format_args!("name of tensor #{i}"))?;
        let n_dims = r.u32(&format_args!("dimension count of tensor {name:?}"))?;
        if n_dims > MAX_DIMS {
            return Err(r.error(format_args!(
                "tensor {name:?} has {n_dims} dimensions (ggml allows at most {MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&format_args!("dimensions of tensor {name:?}"))?);
        }
        let type_id = r.u32(&format_args!("type of tensor {name:?}"))?;
        let ggml_type = GgmlType::from_id(type_id)
            .ok_or_else(|| r.error(format_args!("tensor {name:?} has unknown ggml type {type_id}")))?;
        let offset = r.u64(&format_args!("offset of tensor {name:?}"))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64)
            .ok_or_else(|| r.error(format_args!("tensor {name:?} dimensions {dims:?} overflow")))?;
        let block = ggml_type.block_size();
        let first = dims.first().copied().unwrap_or(1);
        if !first.is_multiple_of(block) {
            return Err(r.error(format_args!(
                "tensor {name:?}: first dimension {first} is not a multiple of the {ggml_type} block size {block}"
            )));
        }
        let n_bytes = (n_elements / block)
            .checked_mul(ggml_type.type_size())
            .ok_or_else(|| r.error(format_args!("tensor {name:?} dimensions {dims:?} overflow")))?;
        if !offset.is_multiple_of(alignment) {
            return Err(r.error(format_args!(
                "tensor {name:?} offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(r.error(format_args!("duplicate tensor name {name:?}")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            n_bytes,
        });
    }
    let infos_end = r.pos as u64;
    let data_offset = infos_end.div_ceil(alignment) * alignment;
    let file_len = buf.len() as u64;
    for t in &tensors {
        let end = data_offset
            .checked_add(t.offset)
            .and_then(|s| s.checked_add(t.n_bytes));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(r.error(format_args!(
                    "tensor {:?} ({} {:?}, {} bytes at data offset {}) extends past the end of the file ({file_len} bytes, data section at {data_offset})",
                    t.name, t.ggml_type, t.dims, t.n_bytes, t.offset
                )))
            }
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds GGUF images by hand for tests.
    pub(crate) struct Builder {
        pub version: u32,
        kvs: Vec<(String, u32, Vec<u8>)>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
        pub alignment: u64,
    }

    pub(crate) fn str_bytes(s: &str) -> Vec<u8> {
        let mut b = (s.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(s.as_bytes());
        b
    }

    impl Builder {
        pub fn new() -> Self {
            Builder {
                version: 3,
                kvs: Vec::new(),
                tensors: Vec::new(),
                alignment: DEFAULT_ALIGNMENT,
            }
        }

        /// Adds a raw key/value: `ty` is the GGUF value type, `value` its encoded bytes.
        pub fn kv_raw(&mut self, key: &str, ty: u32, value: Vec<u8>) -> &mut Self {
            self.kvs.push((key.to_string(), ty, value));
            self
        }
        pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
            self.kv_raw(key, 4, v.to_le_bytes().to_vec())
        }
        pub fn kv_f32(&mut self, key: &str, v: f32) -> &mut Self {
            self.kv_raw(key, 6, v.to_le_bytes().to_vec())
        }
        pub fn kv_bool(&mut self, key: &str, v: bool) -> &mut Self {
            self.kv_raw(key, 7, vec![v as u8])
        }
        pub fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
            self.kv_raw(key, 8, str_bytes(v))
        }
        pub fn kv_str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
            let mut b = 8u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for s in items {
                b.extend_from_slice(&str_bytes(s));
            }
            self.kv_raw(key, 9, b)
        }
        pub fn kv_i32_array(&mut self, key: &str, items: &[i32]) -> &mut Self {
            let mut b = 5u32.to_le_bytes().to_vec();
            b.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for v in items {
                b.extend_from_slice(&v.to_le_bytes());
            }
            self.kv_raw(key, 9, b)
        }

        /// Adds a tensor with GGUF (fastest-first) dims, ggml type id and encoded data.
        pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
            self.tensors.push((name.to_string(), dims.to_vec(), ty, data));
            self
        }

        pub fn f32_tensor(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, dims, 0, data)
        }

        pub fn build(&self) -> Vec<u8> {
            let a = self.alignment as usize;
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&self.version.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
            for (k, ty, v) in &self.kvs {
                out.extend_from_slice(&str_bytes(k));
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(v);
            }
            let mut offset = 0usize;
            let mut offsets = Vec::new();
            for (name, dims, ty, data) in &self.tensors {
                out.extend_from_slice(&str_bytes(name));
                out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
                for d in dims {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&(offset as u64).to_le_bytes());
                offsets.push(offset);
                offset = (offset + data.len()).div_ceil(a) * a;
            }
            out.resize(out.len().div_ceil(a) * a, 0);
            let base = out.len();
            for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
                out.resize(base + off, 0);
                out.extend_from_slice(data);
            }
            out
        }
    }

    fn parse(bytes: Vec<u8>) -> Result<GgufFile> {
        GgufFile::from_bytes(bytes, Path::new("test.gguf"))
    }

    fn parse_err(bytes: Vec<u8>) -> String {
        let e = parse(bytes).unwrap_err().to_string();
        assert!(e.contains("test.gguf"), "error does not name the file: {e}");
        e
    }

    #[test]
    fn parses_all_value_types_and_nested_arrays() {
        let mut b = Builder::new();
        b.kv_raw("u8", 0, vec![200])
            .kv_raw("i8", 1, vec![0xff])
            .kv_raw("u16", 2, 60000u16.to_le_bytes().to_vec())
            .kv_raw("i16", 3, (-3i16).to_le_bytes().to_vec())
            .kv_u32("u32", 7)
            .kv_raw("i32", 5, (-5i32).to_le_bytes().to_vec())
            .kv_f32("f32", 1.5)
            .kv_bool("bool", true)
            .kv_str("str", "héllo")
            .kv_raw("u64", 10, u64::MAX.to_le_bytes().to_vec())
            .kv_raw("i64", 11, (-9i64).to_le_bytes().to_vec())
            .kv_raw("f64", 12, 2.25f64.to_le_bytes().to_vec())
            .kv_str_array("strs", &["a", "", "c"])
            .kv_i32_array("empty", &[]);
        // An array of two arrays of u16.
        let mut nested = 9u32.to_le_bytes().to_vec();
        nested.extend_from_slice(&2u64.to_le_bytes());
        for vals in [[1u16, 2], [3, 4]] {
            nested.extend_from_slice(&2u32.to_le_bytes());
            nested.extend_from_slice(&2u64.to_le_bytes());
            for v in vals {
                nested.extend_from_slice(&v.to_le_bytes());
            }
        }
        b.kv_raw("nested", 9, nested);
        b.f32_tensor("t", &[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let f = parse(b.build()).unwrap();
        let m = &f.metadata;
        assert_eq!(m["u8"], Value::U8(200));
        assert_eq!(m["i8"], Value::I8(-1));
        assert_eq!(m["u16"], Value::U16(60000));
        assert_eq!(m["i16"], Value::I16(-3));
        assert_eq!(m["u32"].as_u64(), Some(7));
        assert_eq!(m["i32"].as_i64(), Some(-5));
        assert_eq!(m["i32"].as_u64(), None);
        assert_eq!(m["f32"].as_f64(), Some(1.5));
        assert_eq!(m["bool"].as_bool(), Some(true));
        assert_eq!(m["str"].as_str(), Some("héllo"));
        assert_eq!(m["u64"], Value::U64(u64::MAX));
        assert_eq!(m["i64"], Value::I64(-9));
        assert_eq!(m["f64"], Value::F64(2.25));
        assert_eq!(
            m["strs"],
            Value::Array(vec![
                Value::String("a".into()),
                Value::String("".into()),
                Value::String("c".into())
            ])
        );
        assert_eq!(m["empty"], Value::Array(vec![]));
        assert_eq!(
            m["nested"],
            Value::Array(vec![
                Value::Array(vec![Value::U16(1), Value::U16(2)]),
                Value::Array(vec![Value::U16(3), Value::U16(4)])
            ])
        );
        let t = f.dequantize_by_name("t").unwrap();
        assert_eq!(t.shape, vec![3, 2]);
        assert_eq!(t.data, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(f.data_offset % 32, 0);
    }

    #[test]
    fn parses_version_2_and_custom_alignment() {
        let mut b = Builder::new();
        b.version = 2;
        b.alignment = 64;
        b.kv_u32("general.alignment", 64);
        b.f32_tensor("a", &[3], &[1.0, 2.0, 3.0]);
        b.f32_tensor("b", &[1], &[4.0]);
        let f = parse(b.build()).unwrap();
        assert_eq!(f.version, 2);
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset % 64, 0);
        assert_eq!(f.tensor_info("b").unwrap().offset, 64);
        assert_eq!(f.dequantize_by_name("b").unwrap().data, vec![4.0]);
    }

    #[test]
    fn refuses_bad_magic_and_versions() {
        let mut bytes = Builder::new().build();
        bytes[0] = b'X';
        assert!(parse_err(bytes).contains("bad magic"));
        assert!(parse_err(b"GG".to_vec()).contains("truncated"));
        assert!(parse_err(Vec::new()).contains("truncated"));
        let mut b = Builder::new();
        b.version = 1;
        assert!(parse_err(b.build()).contains("version 1"));
        b.version = 7;
        assert!(parse_err(b.build()).contains("unknown GGUF version 7"));
        b.version = 3u32.swap_bytes();
        assert!(parse_err(b.build()).contains("big-endian"));
    }

    #[test]
    fn refuses_truncation_anywhere() {
        let mut b = Builder::new();
        b.kv_str("general.architecture", "llama")
            .kv_str_array("list", &["x", "yy"]);
        b.f32_tensor("t", &[4], &[1.0, 2.0, 3.0, 4.0]);
        let full = b.build();
        parse(full.clone()).unwrap();
        // Every strict prefix is refused with an error, never a panic.
        for len in 0..full.len() {
            let e = parse_err(full[..len].to_vec());
            assert!(
                e.contains("truncated") || e.contains("past the end"),
                "prefix {len}: {e}"
            );
        }
    }

    #[test]
    fn refuses_unknown_value_and_tensor_types() {
        let mut b = Builder::new();
        b.kv_raw("weird", 13, vec![0; 8]);
        let e = parse_err(b.build());
        assert!(
            e.contains("unknown metadata value type 13") && e.contains("weird"),
            "{e}"
        );

        let mut b = Builder::new();
        let mut arr = 99u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&0u64.to_le_bytes());
        b.kv_raw("arr", 9, arr);
        assert!(parse_err(b.build()).contains("unknown metadata value type 99"));

        let mut b = Builder::new();
        b.tensor("t", &[4], 5, vec![0; 32]);
        let e = parse_err(b.build());
        assert!(e.contains("unknown ggml type 5") && e.contains("\"t\""), "{e}");
    }

    #[test]
    fn refuses_tensor_past_end_of_file() {
        let mut b = Builder::new();
        b.f32_tensor("t", &[4], &[1.0, 2.0, 3.0, 4.0]);
        let mut bytes = b.build();
        bytes.truncate(bytes.len() - 1);
        let e = parse_err(bytes);
        assert!(e.contains("\"t\"") && e.contains("past the end"), "{e}");

        // Dimensions far larger than the file.
        let mut b = Builder::new();
        b.tensor("big", &[1 << 20, 1 << 20], 0, vec![0; 16]);
        assert!(parse_err(b.build()).contains("past the end"));
        let mut b = Builder::new();
        b.tensor("huge", &[u64::MAX, 2], 0, vec![0; 16]);
        assert!(parse_err(b.build()).contains("overflow"));
    }

    #[test]
    fn refuses_inconsistent_tables() {
        let mut b = Builder::new();
        b.kv_u32("k", 1).kv_u32("k", 2);
        assert!(parse_err(b.build()).contains("duplicate metadata key"));

        let mut b = Builder::new();
        b.f32_tensor("t", &[1], &[1.0]).f32_tensor("t", &[1], &[1.0]);
        assert!(parse_err(b.build()).contains("duplicate tensor name"));

        let mut b = Builder::new();
        b.tensor("q", &[16], 2, vec![0; 18]);
        assert!(parse_err(b.build()).contains("not a multiple of the Q4_0 block size 32"));

        let mut b = Builder::new();
        b.tensor("t", &[1, 1, 1, 1, 1], 0, vec![0; 4]);
        assert!(parse_err(b.build()).contains("5 dimensions"));

        let mut b = Builder::new();
        b.kv_u32("general.alignment", 24);
        assert!(parse_err(b.build()).contains("power of two"));

        let mut b = Builder::new();
        b.kv_raw("bad", 8, {
            let mut v = 2u64.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xff, 0xfe]);
            v
        });
        assert!(parse_err(b.build()).contains("invalid UTF-8"));

        let mut b = Builder::new();
        b.kv_raw("flag", 7, vec![2]);
        assert!(parse_err(b.build()).contains("invalid bool"));

        // A count far beyond the file must not allocate or panic.
        let mut bytes = Builder::new().build();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_err(bytes).contains("declares"));
        let mut bytes = Builder::new().build();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse_err(bytes).contains("tensors declared"));
    }

    #[test]
    fn refuses_deep_nesting() {
        let mut b = Builder::new();
        let mut v = Vec::new();
        for _ in 0..20 {
            v.extend_from_slice(&9u32.to_le_bytes());
            v.extend_from_slice(&1u64.to_le_bytes());
        }
        v.extend_from_slice(&4u32.to_le_bytes());
        v.extend_from_slice(&0u64.to_le_bytes());
        b.kv_raw("deep", 9, v);
        assert!(parse_err(b.build()).contains("nested deeper"));
    }

    #[test]
    fn misaligned_tensor_offset_is_refused() {
        let mut b = Builder::new();
        b.f32_tensor("t", &[1], &[1.0]);
        let mut bytes = b.build();
        // The offset is the last u64 of the (only) tensor info, just before the padding.
        let info_end = 24 + 8 + 1 + 4 + 8 + 4 + 8;
        bytes[info_end - 8..info_end].copy_from_slice(&4u64.to_le_bytes());
        assert!(parse_err(bytes).contains("alignment"));
    }
}
