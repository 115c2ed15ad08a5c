//! Where the trainer computes and in what precision: the CPU in f32, or an NVIDIA GPU (built with
//! `--features cuda`) in bf16 for the frozen base and activations, with the LoRA weights, their
//! gradients and the optimizer state in f32 (as PEFT keeps adapters over a bf16 base).

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// `--device auto|cpu|cuda|cuda:N` and `--dtype auto|f32|bf16`, resolved. `auto` picks a GPU when
/// the binary is built with CUDA and one is present, else the CPU; bf16 on a GPU, f32 on the CPU.
/// `auto` and `cuda` take the first GPU, or in a data-parallel job the rank's own: its local rank
/// among the GPUs it sees (one each when the launcher hides the others).
pub fn select(device: &str, dtype: &str) -> Result<(Device, DType)> {
    let own = own_gpu();
    let dev = match device {
        "auto" => gpu(own).unwrap_or(Device::Cpu),
        "cpu" => Device::Cpu,
        d if d == "cuda" || d.starts_with("cuda:") => {
            let n: usize = match d.strip_prefix("cuda:") {
                None => own,
                Some(n) => n
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--device {d}: expected cuda or cuda:N with N the GPU's index"))?,
            };
            match gpu(n) {
                Some(g) => g,
                None if cfg!(feature = "cuda") => bail!("--device {d}: no usable NVIDIA GPU with index {n} was found"),
                None => bail!(
                    "--device {d}: this tunekit was built without GPU support; rebuild with \
                     `cargo build --release --features cuda` (needs nvcc) or use --device cpu"
                ),
            }
        }
        other => bail!("--device {other}: use auto, cpu, cuda or cuda:N"),
    };
    let dt = match (dtype, dev.is_cpu()) {
        ("auto", true) | ("f32", _) => DType::F32,
        ("auto", false) | ("bf16", false) => DType::BF16,
        ("bf16", true) => bail!("--dtype bf16 is for GPUs; on the CPU tunekit computes in f32 (use --dtype f32)"),
        (other, _) => bail!("--dtype {other}: use auto, f32 or bf16"),
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
        let (d, t) = select("cpu", "auto").unwrap();
        assert!(d.is_cpu());
        assert_eq!(t, DType::F32);
        assert!(select("cpu", "bf16").unwrap_err().to_string().contains("GPUs"));
        assert!(select("tpu", "auto").unwrap_err().to_string().contains("auto, cpu, cuda"));
        assert!(select("cpu", "f8").unwrap_err().to_string().contains("f32 or bf16"));
        #[cfg(not(feature = "cuda"))]
        {
            assert!(select("auto", "auto").unwrap().0.is_cpu());
            assert!(select("cuda", "auto").unwrap_err().to_string().contains("--features cuda"));
        }
    }
}
