//! A GGUF v3 file written tensor by tensor: the header (metadata and every tensor's name, shape,
//! type and offset) first, from the tensors' declared shapes and types, then each tensor's bytes as
//! it is produced, so a model is never held whole. Written under a temporary name and renamed when
//! complete (an interrupted export leaves no file that looks finished).

use crate::output::AtomicFile;
use anyhow::{bail, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use std::io::Write;
use std::path::Path;

/// Data alignment (llama.cpp's default `general.alignment`).
const ALIGN: u64 = 32;

/// A tensor to be written: its name, row-major shape (outermost first) and type.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorSpec {
    /// Bytes of the tensor's data in its type.
    pub fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        n / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// ggml's type ids.
fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) -> Result<()> {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let t = items.first().map_or(0, value_type);
            if items.iter().any(|i| value_type(i) != t) {
                bail!("a GGUF array holds one type; this one mixes types");
            }
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i)?;
            }
        }
    }
    Ok(())
}

fn padding(n: u64) -> u64 {
    (ALIGN - n % ALIGN) % ALIGN
}

/// Writes `path`: `metadata` in order, then the tensors of `specs`, the bytes of tensor `i` from
/// `data(i)` (which must be exactly `specs[i].bytes()` long).
pub fn write(
    path: &Path,
    metadata: &[(String, Value)],
    specs: &[TensorSpec],
    mut data: impl FnMut(usize) -> Result<Vec<u8>>,
) -> Result<u64> {
    let mut head = Vec::new();
    head.extend_from_slice(b"GGUF");
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(specs.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut head, k);
        head.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut head, v)?;
    }
    let mut offset = 0u64;
    for s in specs {
        let inner = *s.shape.last().unwrap_or(&1);
        if !inner.is_multiple_of(s.dtype.block_size()) {
            bail!("{}: rows of {inner} do not fill {:?} blocks of {}", s.name, s.dtype, s.dtype.block_size());
        }
        put_str(&mut head, &s.name);
        head.extend_from_slice(&(s.shape.len() as u32).to_le_bytes());
        for &d in s.shape.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes());
        }
        head.extend_from_slice(&type_id(s.dtype).to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset += s.bytes() as u64;
        offset += padding(offset);
    }
    head.resize(head.len() + padding(head.len() as u64) as usize, 0);
    let mut f = AtomicFile::create(path)?;
    f.write_all(&head)?;
    let mut written = head.len() as u64;
    for (i, s) in specs.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != s.bytes() {
            bail!("internal error: {} has {} bytes, its header says {}", s.name, bytes.len(), s.bytes());
        }
        f.write_all(&bytes)?;
        let pad = padding(bytes.len() as u64);
        f.write_all(&vec![0u8; pad as usize])?;
        written += bytes.len() as u64 + pad;
    }
    f.commit()?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};

    #[test]
    fn candle_reads_back_what_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let a = Tensor::arange(0f32, 64.0, &Device::Cpu).unwrap().reshape((2, 32)).unwrap();
        let q = QTensor::quantize(&a, GgmlDType::Q8_0).unwrap();
        let specs = vec![
            TensorSpec { name: "a".into(), shape: vec![2, 32], dtype: GgmlDType::F32 },
            TensorSpec { name: "q".into(), shape: vec![2, 32], dtype: GgmlDType::Q8_0 },
        ];
        let md = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("x.list".to_string(), Value::Array(vec![Value::I32(1), Value::I32(2)])),
            ("x.alpha".to_string(), Value::F32(16.0)),
        ];
        write(&p, &md, &specs, |i| {
            Ok(if i == 0 {
                a.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()
            } else {
                q.data()?.to_vec()
            })
        })
        .unwrap();
        let mut f = std::fs::File::open(&p).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(c.metadata["x.alpha"].to_f32().unwrap(), 16.0);
        assert_eq!(c.metadata["x.list"].to_vec().unwrap().len(), 2);
        let back = c.tensor(&mut f, "a", &Device::Cpu).unwrap().dequantize(&Device::Cpu).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), a.to_vec2::<f32>().unwrap());
        let qb = c.tensor(&mut f, "q", &Device::Cpu).unwrap();
        assert_eq!((qb.shape().dims(), qb.dtype()), (&[2usize, 32][..], GgmlDType::Q8_0));
    }
}
