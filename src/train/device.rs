//! Where the trainer computes and in what precision: the CPU in f32, or an NVIDIA GPU (built with
//! `--features cuda`) in bf16 for the frozen base and activations, with the LoRA weights, their
//! gradients and the optimizer state in f32 (as PEFT keeps adapters over a bf16 base); and the
//! flags that say so (`--device`, `--dtype`, `--qlora`), parsed once into [`DeviceSpec`],
//! [`Precision`] and [`Qlora`].

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

/// `--device`: where to compute. `auto` picks a GPU when the binary is built with CUDA and one is
/// present, else the CPU; `cuda` the first GPU (in a data-parallel job the rank's own); `cuda:N`
/// the GPU with index N. Written and read as that text (options, config files, checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Auto,
    Cpu,
    /// A GPU: its index, or None for the rank's own.
    Cuda(Option<usize>),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DeviceSpec::Auto,
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(None),
            d => {
                match d.strip_prefix("cuda:") {
                    Some(n) => DeviceSpec::Cuda(Some(n.parse().map_err(|_| {
                        anyhow::anyhow!("--device {d}: expected cuda or cuda:N with N the GPU's index")
                    })?)),
                    None => bail!("--device {d}: use auto, cpu, cuda or cuda:N"),
                }
            }
        })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(None) => f.write_str("cuda"),
            DeviceSpec::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// `--dtype`: the compute precision of the frozen base and activations (adapters, gradients and
/// optimizer state are f32 always). `auto`: bf16 on a GPU, f32 on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Auto,
    F32,
    Bf16,
}

/// `--qlora`: how a QLoRA run holds the frozen projections in 4 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Qlora {
    /// NormalFloat4, blocks of 64 with double-quantised scales (bitsandbytes' NF4), from any base.
    Nf4,
    /// A GGUF base's own quantised blocks, kept as the file has them.
    Gguf,
}

/// The device and dtype `device` and `dtype` resolve to on this machine (and this rank).
pub fn select(device: DeviceSpec, dtype: Precision) -> Result<(Device, DType)> {
    let own = own_gpu();
    let dev = match device {
        DeviceSpec::Auto => gpu(own).unwrap_or(Device::Cpu),
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(index) => {
            let n = index.unwrap_or(own);
            match gpu(n) {
                Some(g) => g,
                None if cfg!(feature = "cuda") => {
                    bail!("--device {device}: no usable NVIDIA GPU with index {n} was found")
                }
                None => bail!(
                    "--device {device}: this tunekit was built without GPU support; rebuild with \
                     `cargo build --release --features cuda` (needs nvcc) or use --device cpu"
                ),
            }
        }
    };
    let dt = match (dtype, dev.is_cpu()) {
        (Precision::Auto, true) | (Precision::F32, _) => DType::F32,
        (Precision::Auto, false) | (Precision::Bf16, false) => DType::BF16,
        (Precision::Bf16, true) => {
            bail!("--dtype bf16 is for GPUs; on the CPU tunekit computes in f32 (use --dtype f32)")
        }
    };
    Ok((dev, dt))
}

/// The GPU of this rank: its local rank, modulo the GPUs this process sees.
fn own_gpu() -> usize {
    let world = crate::cluster::world();
    if world.size == 1 {
        return 0;
    }
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let seen = CudaContext::device_count().ok().filter(|&n| n > 0).unwrap_or(1) as usize;
        world.launch.local_rank % seen
    }
    #[cfg(not(feature = "cuda"))]
    world.launch.local_rank
}

#[cfg(feature = "cuda")]
fn gpu(n: usize) -> Option<Device> {
    let dev = Device::new_cuda(n).ok()?;
    if let Device::Cuda(d) = &dev {
        // SAFETY: tunekit uses the device's one stream only, so cross-stream event tracking is not
        // needed (it records events on every tensor, a large cost per small op).
        unsafe { d.disable_event_tracking() };
    }
    Some(dev)
}

#[cfg(not(feature = "cuda"))]
fn gpu(_n: usize) -> Option<Device> {
    None
}

/// Memory in use on the GPU (all processes, as nvidia-smi counts it), in MB; None on the CPU.
pub fn gpu_used_mb(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let info = d.cuda_stream().context().mem_get_info().ok();
        return info.map(|(free, total)| (total - free) as f64 / (1u64 << 20) as f64);
    }
    let _ = device;
    None
}

/// A human name for the summary: "cpu (f32)", "cuda:0 (bf16)".
pub fn describe(device: &Device, dtype: DType) -> String {
    let d = match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    };
    format!("{d} ({})", dtype.as_str())
}

/// Peak resident set size of this process (Linux), in MB.
/// Memory the system can give a new allocation without swapping (Linux's MemAvailable), in MB;
/// None where it cannot be read.
pub fn available_memory_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = s.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<f64>().ok()?;
    Some(kb / 1024.0)
}

pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_defaults_to_f32_and_refuses_bf16_and_unknown_names() {
        let spec = |s: &str| s.parse::<DeviceSpec>();
        let (d, t) = select(DeviceSpec::Cpu, Precision::Auto).unwrap();
        assert!(d.is_cpu());
        assert_eq!(t, DType::F32);
        assert!(select(DeviceSpec::Cpu, Precision::Bf16).unwrap_err().to_string().contains("GPUs"));
        assert!(spec("tpu").unwrap_err().to_string().contains("auto, cpu, cuda"));
        assert!(spec("cuda:x").unwrap_err().to_string().contains("cuda:N"));
        for s in ["auto", "cpu", "cuda", "cuda:3"] {
            assert_eq!(spec(s).unwrap().to_string(), s);
            assert_eq!(serde_json::to_string(&spec(s).unwrap()).unwrap(), format!("\"{s}\""));
        }
        #[cfg(not(feature = "cuda"))]
        {
            assert!(select(DeviceSpec::Auto, Precision::Auto).unwrap().0.is_cpu());
            assert!(select(DeviceSpec::Cuda(None), Precision::Auto)
                .unwrap_err()
                .to_string()
                .contains("--features cuda"));
        }
    }
}
