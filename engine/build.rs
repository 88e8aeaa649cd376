//! With the `cuda` feature, compiles Graft's CUDA kernels (`src/backend/cuda/*.cu`) to PTX with nvcc
//! (from `PATH`, else `$CUDA_ROOT/bin`; `cuda/toolkit.sh` makes a toolkit from PyPI). The
//! driver compiles the PTX for the GPU it finds at first use, so one build serves every GPU
//! from `compute_<CUDA_COMPUTE_CAP>` (default 80: Ampere, Hopper and later) up.

use std::{env, path::PathBuf, process::Command};

const KERNELS: &[&str] = &["nf4", "dropout", "lora"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/backend/cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "nvcc".into());
    for kernel in KERNELS {
        let source = format!("src/backend/cuda/{kernel}.cu");
        let ptx = out.join(format!("{kernel}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "running {}: {e} (is the CUDA toolkit on PATH?)",
                    nvcc.display()
                )
            });
        assert!(status.success(), "nvcc failed on {source}");
    }
}
