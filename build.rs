//! With `--features cuda`, compiles tunekit's own CUDA kernels (src/train/model/softmax.cu,
//! src/train/optim/adamw.cu) to PTX with nvcc, for the compute capability in CUDA_COMPUTE_CAP
//! (default 80: Ampere and newer).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/train/model/softmax.cu");
    println!("cargo::rerun-if-changed=src/train/optim/adamw.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for (name, src) in [("softmax", "src/train/model/softmax.cu"), ("adamw", "src/train/optim/adamw.cu")] {
        let status = std::process::Command::new("nvcc")
            .args(["--ptx", "-O3", "-std=c++17", &format!("--gpu-architecture=compute_{cap}")])
            .arg(src)
            .arg("-o")
            .arg(out.join(format!("{name}.ptx")))
            .status()
            .expect("--features cuda needs nvcc on PATH (see README, GPU)");
        assert!(status.success(), "nvcc failed on {src}");
    }
}
