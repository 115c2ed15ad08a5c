//! TensorBoard event files (`train --report-to tensorboard`): the TFRecord framing (length, masked
//! CRC32C of the length, the record, masked CRC32C of the record) around `Event` protocol buffers
//! written by hand: the file version first, then a scalar summary per metric and step and the run's
//! options as a text summary, so `tensorboard --logdir` shows tunekit runs beside others. Each event
//! is flushed as it is written, so a live run shows in TensorBoard. metrics.jsonl stays the record.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli), as TFRecord frames records with.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8))
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// Protocol buffer pieces.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    varint(out, ((field << 3) | 2) as u64);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn event(wall: f64, step: i64, what: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = vec![0x09]; // wall_time: field 1, 64-bit
    e.extend_from_slice(&wall.to_le_bytes());
    varint(&mut e, 0x10); // step: field 2, varint
    varint(&mut e, step as u64);
    what(&mut e);
    e
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard finds them.
    pub fn create(dir: &Path) -> Result<EventWriter> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}.tunekit", now() as u64, std::process::id()));
        let file = std::fs::File::create(&path).with_context(|| format!("cannot write {}", path.display()))?;
        let mut w = EventWriter { file: std::io::BufWriter::new(file), path };
        let version = event(now(), 0, |e| field_bytes(e, 3, b"brain.Event:2"));
        w.record(&version)?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked(crc32c(&len)).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked(crc32c(data)).to_le_bytes())?;
        self.file.flush()?;
        Ok(())
    }

    /// Scalars at `step`, one Summary.Value (tag, simple_value) each.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = vec![];
        for (tag, v) in values {
            let mut value = vec![];
            field_bytes(&mut value, 1, tag.as_bytes());
            value.push(0x15); // simple_value: field 2, 32-bit
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(&mut summary, 1, &value);
        }
        let e = event(now(), step as i64, |e| field_bytes(e, 5, &summary));
        self.record(&e)
    }

    /// A text summary (TensorBoard's text plugin: a string tensor with the plugin's metadata).
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        let mut plugin = vec![];
        field_bytes(&mut plugin, 1, b"text");
        let mut metadata = vec![];
        field_bytes(&mut metadata, 1, &plugin);
        let mut tensor = vec![0x08, 7]; // dtype DT_STRING
        field_bytes(&mut tensor, 2, &[]); // tensor_shape: a scalar
        field_bytes(&mut tensor, 8, text.as_bytes()); // string_val
        let mut value = vec![];
        field_bytes(&mut value, 1, tag.as_bytes());
        field_bytes(&mut value, 8, &tensor);
        field_bytes(&mut value, 9, &metadata);
        let mut summary = vec![];
        field_bytes(&mut summary, 1, &value);
        let e = event(now(), step as i64, |e| field_bytes(e, 5, &summary));
        self.record(&e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_castagnolis() {
        // The check value of CRC-32C.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
